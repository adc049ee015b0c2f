#!/usr/bin/env bash
# What a download costs the other connections of the same agent link, across a real
# round trip, against the same connections through another agent's link. One relay across
# a delay line, two agents forwarding the same echo service; while a bulk echo (both ways)
# runs through agent 1:
#   - a 64-byte ping-pong through agent 1 (shares the link, its queue and its one TCP
#     connection) and through agent 2 (its own link: shares only the machine and the relay);
#   - new connections through agent 1 (connect + 8-byte echo + close).
# The difference between the two pings is what sharing the link costs: with loss, the
# retransmissions of the link's TCP connection (head-of-line blocking); on a busy machine,
# the link's receive queue when a side's reader falls behind.
#
# Usage (root, from the project's root):
#   WAN=/path/to/wan PROBE=/path/to/probe benches/shared-link-wan.sh [RTT_MS] [PINGS] [WAN_ARGS...]
# WAN names the delay line, as for benches/fleet-wan.sh (`$WAN up --rtt-ms N --mtu 1500
# [WAN_ARGS]` joins namespaces pfw-r, 198.18.0.1, and pfw-a, 198.18.0.2, in the foreground
# until SIGINT; e.g. `--loss 1` for 1 % random loss each way). PROBE names the probe client:
# `probe echo ADDR`, `probe bulk ADDR BYTES`, `probe rtt ADDR N SIZE` and `probe setup ADDR N`,
# each printing p50 and p99 in microseconds.
set -u
RTT=${1:-40}
PINGS=${2:-200}
shift $(($# < 2 ? $# : 2))
WAN=${WAN:?set WAN to the delay line program}
PROBE=${PROBE:?set PROBE to the probe client}
cargo build --release -q --bin portferry || exit 1
PF=target/release/portferry
. "$(dirname "$0")/wan-common.sh"
start() { # NAMESPACE NAME COMMAND...: in the background, output in $W/NAME.{out,err}
  local ns=$1 name=$2; shift 2
  ip netns exec "$ns" "$@" >"$W/$name.out" 2>"$W/$name.err" &
  pids+=($!)
}
ms() { # PROBE OUTPUT: "p50 X p99 Y ms" from microseconds
  awk '/p50/ {for (i = 1; i < NF; i++) {if ($i ~ /p50/) a = $(i+1); if ($i ~ /p99/) b = $(i+1)}
       printf "p50 %.1f  p99 %.1f ms", a / 1000, b / 1000; f = 1} END {if (!f) printf "failed"}'
}

start_wan "$RTT" "$@" >/dev/null || exit 1
# The relay's name, which its certificate covers, resolved across the line.
mkdir -p /etc/netns/pfw-a
printf '127.0.0.1 localhost\n198.18.0.1 portferry.localhost\n' >/etc/netns/pfw-a/hosts
start pfw-a echo "$PROBE" echo 127.0.0.1:7001
start pfw-r relay "$PF" relay --agent-addr 198.18.0.1:7835 --state-dir "$W/state"
wait_line "$W/relay.out" '^PORTFERRY_RELAY_CA=' >/dev/null || exit 1
env=$(grep -E '^PORTFERRY_(RELAY|TOKEN|RELAY_CA)=' "$W/relay.out")
for agent in agent1 agent2; do
  start pfw-a "$agent" env $env "$PF" forward 7001 --unencrypted
done
port() { wait_line "$W/$1.out" '^tcp socket:' | sed 's/.*://'; }
P1=$(port agent1) && P2=$(port agent2) || exit 1
ping() { timeout 120 ip netns exec pfw-r "$PROBE" rtt "127.0.0.1:$1" "$PINGS" 64 2>/dev/null | ms; }
setup() { timeout 120 ip netns exec pfw-r "$PROBE" setup "127.0.0.1:$1" 20 2>/dev/null | ms; }

echo "$(head -1 "$W/wan.out"); $PINGS pings of 64 bytes per row; $(nproc) cores"
echo "idle, ping through agent 1:                                $(ping "$P1")"
start pfw-r bulk "$PROBE" bulk "127.0.0.1:$P1" 1000000000000
sleep 2
echo "bulk echo through agent 1, ping through agent 1 (same link): $(ping "$P1")"
echo "bulk echo through agent 1, ping through agent 2 (own link):  $(ping "$P2")"
echo "bulk echo through agent 1, new connections through agent 1:  $(setup "$P1")"
