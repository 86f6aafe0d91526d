from tally.service import serve
from tally_wallet.app import SPEC


def main() -> None:
    serve(SPEC)


if __name__ == "__main__":
    main()
