from tally.service import serve
from tally_usage_meter.app import SPEC


def main() -> None:
    serve(SPEC)


if __name__ == "__main__":
    main()
