# Shared by the delay-line benches (benches/*-wan.sh), sourced once WAN names the delay
# line. Checks for root and a free line, and gives: W, a scratch directory; pids, the
# background processes to stop; wait_line; start_wan; and, on exit, a cleanup that stops
# them, takes the line down and removes the namespaces' files.
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; exit 1; }
[ -e /run/netns/pfw-r ] && { echo "the delay line is in use (namespace pfw-r exists)"; exit 1; }
W=$(mktemp -d "/tmp/$(basename "$0" .sh).XXXXXX")
pids=()
WANPID=
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  if [ -n "$WANPID" ]; then
    kill -INT "$WANPID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$WANPID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$WANPID" 2>/dev/null; wait "$WANPID" 2>/dev/null
  fi
  { [ -e /run/netns/pfw-r ] || [ -e /run/netns/pfw-a ]; } && "$WAN" down
  rm -rf /etc/netns/pfw-a "$W"; rmdir /etc/netns 2>/dev/null
}
trap cleanup EXIT
trap 'echo interrupted; exit 130' INT TERM
wait_line() { # FILE REGEX: until a line matches (at most 20 s); prints it
  for _ in $(seq 200); do
    grep -m1 -E "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no '$2' in $1:" >&2; cat "$1" "${1%.out}.err" >&2 2>/dev/null; return 1
}
start_wan() { # RTT_MS [MORE ARGUMENTS OF `wan up`]: the line up (in the background); prints its first line
  "$WAN" up --rtt-ms "$1" --mtu 1500 "${@:2}" >"$W/wan.out" 2>&1 &
  WANPID=$!
  wait_line "$W/wan.out" '^wan: up'
}
