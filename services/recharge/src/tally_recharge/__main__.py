from tally.service import serve
from tally_recharge.app import SPEC


def main() -> None:
    serve(SPEC)


if __name__ == "__main__":
    main()
