#!/bin/sh
# contrib/valgrind-chatd.sh - chatd under valgrind memcheck, for the
# integration harness: CHATD=contrib/valgrind-chatd.sh (docs/fuzzing.md,
# Memory).  --quiet prints only findings ("==PID== ..." lines in the node's
# log), which harness.py's check_sanitizers treats as a failure; leaks
# definite and indirect count as errors (exit 99).  VALGRIND_CHATD picks
# the binary (default: build/chatd of this tree).
here=$(cd "$(dirname "$0")/.." && pwd)
exec valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect \
    --errors-for-leak-kinds=definite,indirect --error-exitcode=99 \
    --num-callers=30 "${VALGRIND_CHATD:-$here/build/chatd}" "$@"
