#!/usr/bin/env bash
# The consumer check: portferry builds and works as a dependency of a crate outside
# its workspace, with no [patch]. The crate in .ci/consumer/ is copied to a temporary
# directory, pointed at this checkout by absolute path, and built twice: as the agent
# library alone (`default-features = false, features = ["agent"]`) and with the default
# features. Each build runs against a real `portferry relay` on loopback: the program
# forwards a local HTTP service and this script fetches its page through the tunnel
# with curl. Fails if the fetch fails, if the consumer's manifest has a [patch], if the
# vanilla smoltcp is built, or if the lean build pulls in a command-line or relay crate.
#
# Runs on its own (`bash .ci/consumer.sh`) and as a step of .ci/run. Builds share the
# workspace's target directory (CARGO_TARGET_DIR), and the consumer starts from the
# workspace's Cargo.lock, so the dependencies already built are reused.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${repo}/target}"

work="$(mktemp -d "${TMPDIR:-/tmp}/portferry-consumer.XXXXXX")"
relay_pid=""
consumer_pid=""
cleanup() {
  for pid in ${consumer_pid} ${relay_pid}; do
    kill "${pid}" 2>/dev/null || true
    wait "${pid}" 2>/dev/null || true
  done
  rm -rf "${work}"
}
trap cleanup EXIT

fail() { echo "consumer check failed: $*" >&2; exit 1; }
# Echoes a command, then runs it.
run() { echo "\$ $*"; "$@"; }
# Waits up to $2 seconds for a line matching $1 in file $3.
wait_for_line() {
  local pattern="$1" seconds="$2" file="$3" tries
  for ((tries = seconds * 10; tries > 0; tries--)); do
    grep -qE "${pattern}" "${file}" && return 0
    sleep 0.1
  done
  return 1
}

# The relay: the repository's own binary, on loopback ports the kernel picks.
run cargo build --quiet --manifest-path "${repo}/Cargo.toml" --bin portferry
"${CARGO_TARGET_DIR}/debug/portferry" relay --state-dir "${work}/relay-state" \
  --agent-addr 127.0.0.1:0 --public-addr 127.0.0.1:0 \
  >"${work}/relay.out" 2>"${work}/relay.err" &
relay_pid=$!
wait_for_line '^export PORTFERRY_' 30 "${work}/relay.out" ||
  { cat "${work}/relay.err" >&2; fail "the relay printed no environment"; }
printed() { sed -n "s/^$1=//p" "${work}/relay.out"; }
PORTFERRY_RELAY="$(printed PORTFERRY_RELAY)"
PORTFERRY_TOKEN="$(printed PORTFERRY_TOKEN)"
PORTFERRY_RELAY_CA="$(printed PORTFERRY_RELAY_CA)"
export PORTFERRY_RELAY PORTFERRY_TOKEN PORTFERRY_RELAY_CA
echo "relay running: PORTFERRY_RELAY=${PORTFERRY_RELAY}, CA ${PORTFERRY_RELAY_CA}"

# Builds the consumer with dependency options $2 (named $1), checks its dependencies,
# runs it and fetches its page through the tunnel.
check_consumer() {
  local name="$1" features="$2"
  local dir="${work}/consumer-${name}"
  echo
  echo "--- consumer, ${name}: portferry = { path = \"${repo}\"${features} }"
  cp -r "${repo}/.ci/consumer" "${dir}"
  sed -e "s|@PORTFERRY@|${repo}|" -e "s|@FEATURES@|${features}|" \
    "${dir}/Cargo.toml.in" >"${dir}/Cargo.toml"
  rm "${dir}/Cargo.toml.in"
  cp "${repo}/Cargo.lock" "${dir}/Cargo.lock"
  if grep -nE '^[[:space:]]*\[patch' "${dir}/Cargo.toml"; then
    fail "the consumer's manifest has a [patch] section"
  fi
  cd "${dir}"
  run cargo build --quiet

  local tree
  tree="$(cargo tree -e normal --prefix none)"
  if grep -E '^smoltcp ' <<<"${tree}"; then
    fail "the ${name} build uses the vanilla smoltcp (above), not portferry-smoltcp"
  fi
  grep -E '^portferry-smoltcp ' <<<"${tree}" | head -n 1
  if [ "${name}" = lean ]; then
    if grep -E '^(clap|anyhow|tracing-subscriber|rcgen) ' <<<"${tree}"; then
      fail "the lean build depends on a command-line or relay crate (above)"
    fi
  fi
  echo "$(sed 's/ (\*)//; s/ (proc-macro)//' <<<"${tree}" | sort -u | wc -l) crates in the ${name} build (the consumer included)"

  # The program serves until its standard input closes: hold a pipe open meanwhile.
  rm -f "${work}/stdin"
  mkfifo "${work}/stdin"
  "${CARGO_TARGET_DIR}/debug/portferry-consumer" <"${work}/stdin" >"${work}/${name}.out" 2>&1 &
  consumer_pid=$!
  exec 3>"${work}/stdin"
  wait_for_line '^url: ' 30 "${work}/${name}.out" ||
    { cat "${work}/${name}.out" >&2; fail "the ${name} consumer printed no URL"; }
  local url
  url="$(sed -n 's/^url: //p' "${work}/${name}.out")"
  echo "the consumer printed: url: ${url}"
  local page
  echo "\$ curl --cacert ${PORTFERRY_RELAY_CA} ${url}/"
  page="$(curl --silent --show-error --fail --max-time 10 --cacert "${PORTFERRY_RELAY_CA}" "${url}/")" ||
    fail "cannot fetch the ${name} consumer's page through ${url}"
  echo "${page}"
  [ "${page}" = "served by a crate that depends on portferry" ] ||
    fail "the page fetched through the ${name} consumer's tunnel is not its page"

  # Closing the input closes the tunnel: the program says so and exits 0.
  exec 3>&-
  local status=0
  wait "${consumer_pid}" || status=$?
  consumer_pid=""
  cat "${work}/${name}.out"
  [ "${status}" -eq 0 ] || fail "the ${name} consumer exited with status ${status}"
  grep -q '^closed$' "${work}/${name}.out" || fail "the ${name} consumer did not close its tunnel"
  if curl --silent --max-time 10 --cacert "${PORTFERRY_RELAY_CA}" "${url}/" >/dev/null; then
    fail "${url} still answers after the tunnel was closed"
  fi
  echo "${url} no longer answers once closed"
  cd "${repo}"
}

check_consumer lean ', default-features = false, features = ["agent"]'
check_consumer default ''
echo
echo "consumer check passed"
