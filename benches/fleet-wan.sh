#!/usr/bin/env bash
# Several relays across a real round trip: one relay across a delay line, one near (on
# the agent's own loopback). Shows which relay the agent picks, with its probe figures,
# and times Agent::connect + forward() with the near relay alone, the far one alone, and
# both, in one run (examples/nearest_relay.rs, the configurations in turn).
#
# Usage (root, from the project's root): WAN=/path/to/wan benches/fleet-wan.sh [RTT_MS] [RUNS]
# WAN names the delay line: `$WAN up --rtt-ms N --mtu 1500` joins two network namespaces,
# pfw-r (198.18.0.1) and pfw-a (198.18.0.2), by a link that delivers every packet half
# the round trip later each way, in the foreground until SIGINT; `$WAN down` removes
# leftovers. The far relay runs in pfw-r, the near relay and the agent in pfw-a.
set -u
RTT=${1:-40}
RUNS=${2:-10}
WAN=${WAN:?set WAN to the delay line program}
cargo build --release -q --bin portferry --example nearest_relay || exit 1
PF=target/release/portferry
PROBE=target/release/examples/nearest_relay
. "$(dirname "$0")/wan-common.sh"

start_wan "$RTT" || exit 1
# The far relay's domain, which its certificate covers: pfw-a resolves it across the line.
# (Not a name under .localhost, which an agent reaches at localhost.)
mkdir -p /etc/netns/pfw-a
printf '127.0.0.1 localhost\n198.18.0.1 far.test\n' >/etc/netns/pfw-a/hosts
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN" >"$W/tokens"

ip netns exec pfw-r "$PF" relay --agent-addr 198.18.0.1:7835 --domain far.test --state-dir "$W/far" \
  --tokens-file "$W/tokens" >"$W/far.out" 2>"$W/far.err" &
pids+=($!)
ip netns exec pfw-a "$PF" relay --agent-addr 127.0.0.1:7836 --state-dir "$W/near" \
  --tokens-file "$W/tokens" >"$W/near.out" 2>"$W/near.err" &
pids+=($!)
FAR_CA=$(wait_line "$W/far.out" '^PORTFERRY_RELAY_CA=' | sed 's/^[^=]*=//') || exit 1
NEAR_CA=$(wait_line "$W/near.out" '^PORTFERRY_RELAY_CA=' | sed 's/^[^=]*=//') || exit 1
cat "$FAR_CA" "$NEAR_CA" >"$W/cas.pem"

FAR=far.test:7835
NEAR=localhost:7836
# The far relay by address: no name to look up (its certificate does not name the
# address, so that probe fails, long after the choice): what the lookup costs.
FAR_IP=198.18.0.1:7835
echo "delay line: $(head -1 "$W/wan.out"); far relay $FAR across it, near relay $NEAR; $(nproc) cores"
ip netns exec pfw-a env PORTFERRY_RELAY="$NEAR" PORTFERRY_TOKEN="$TOKEN" \
  PORTFERRY_RELAY_CA="$W/cas.pem" "$PROBE" "$RUNS" 8000 "$NEAR" "$FAR" "$FAR_IP,$NEAR" "$FAR,$NEAR"
