#!/bin/sh
# The image's entrypoint (Dockerfile). No arguments, or only options: the service TALLY_SERVICE
# names, `python -m tally_<service> [options]` (`--migrate`: apply its migrations and exit, the
# Helm hook; `--migrate --status`: show them). Anything else is a command, run as it is given:
# `tally migrate --status`, `tally migrate`, `tally token product`, `python`, `sh`.
set -eu
case "${1:-}" in
    "" | -*)
        case "${TALLY_SERVICE:-}" in
            usage-meter | wallet | recharge | rebilling | notifier) ;;
            *)
                echo "TALLY_SERVICE is '${TALLY_SERVICE:-}': set it to usage-meter, wallet," \
                    "recharge, rebilling or notifier (or give a command, such as tally --help)" >&2
                exit 2
                ;;
        esac
        exec python -m "tally_$(printf '%s' "$TALLY_SERVICE" | tr - _)" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
