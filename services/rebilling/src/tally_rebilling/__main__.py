from tally.service import serve
from tally_rebilling.app import SPEC


def main() -> None:
    serve(SPEC)


if __name__ == "__main__":
    main()
