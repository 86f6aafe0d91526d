from tally.service import serve
from tally_notifier.app import SPEC


def main() -> None:
    serve(SPEC)


if __name__ == "__main__":
    main()
