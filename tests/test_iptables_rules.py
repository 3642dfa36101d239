"""`mizzen iptables --dry-run` against the seed's listing and against what istio-iptables 1.8 emits.

Expectations are written out by hand from istio-iptables' source (tools/istio-iptables/pkg/cmd/run.go at
1.8.x, its run_test.go, and the capture/testdata/*.golden files of later releases where 1.8 behaves the
same), in the form iptables-save prints after the rules are applied to an empty table. The netns test
(test_iptables_netns.py) checks that the real kernel agrees with these texts.
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest

from mizzen.services.cli import iptables as cli
from mizzen.services.sidecar import iptables as ipt

# The seed's command (istio-notes.md, "sidecar 对流量的劫持"), as argv.
SEED_ARGV = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
             "-d", "15090,15021,15020"]

# The seed's `iptables -t nat -L -n -v`, verbatim.
SEED_LISTING = """\
Chain PREROUTING (policy ACCEPT 81387 packets, 4883K bytes)
 pkts bytes target     prot opt in     out     source               destination
81387 4883K ISTIO_INBOUND  tcp  --  any    any     anywhere             anywhere

Chain INPUT (policy ACCEPT 81387 packets, 4883K bytes)
 pkts bytes target     prot opt in     out     source               destination

Chain OUTPUT (policy ACCEPT 76333 packets, 7134K bytes)
 pkts bytes target     prot opt in     out     source               destination
  186 11160 ISTIO_OUTPUT  tcp  --  any    any     anywhere             anywhere

Chain POSTROUTING (policy ACCEPT 76333 packets, 7134K bytes)
 pkts bytes target     prot opt in     out     source               destination

Chain ISTIO_INBOUND (1 references)
 pkts bytes target     prot opt in     out     source               destination
    0     0 RETURN     tcp  --  any    any     anywhere             anywhere             tcp dpt:15008
    0     0 RETURN     tcp  --  any    any     anywhere             anywhere             tcp dpt:ssh
    0     0 RETURN     tcp  --  any    any     anywhere             anywhere             tcp dpt:15090
81387 4883K RETURN     tcp  --  any    any     anywhere             anywhere             tcp dpt:15021
    0     0 RETURN     tcp  --  any    any     anywhere             anywhere             tcp dpt:15020
    0     0 ISTIO_IN_REDIRECT  tcp  --  any    any     anywhere             anywhere

Chain ISTIO_IN_REDIRECT (3 references)
 pkts bytes target     prot opt in     out     source               destination
    0     0 REDIRECT   tcp  --  any    any     anywhere             anywhere             redir ports 15006

Chain ISTIO_OUTPUT (1 references)
 pkts bytes target     prot opt in     out     source               destination
    0     0 RETURN     all  --  any    lo      127.0.0.6            anywhere
    0     0 ISTIO_IN_REDIRECT  all  --  any    lo      anywhere            !127.0.0.1    owner UID match 1337
    0     0 RETURN     all  --  any    lo      anywhere             anywhere             ! owner UID match 1337
  186 11160 RETURN     all  --  any    any     anywhere             anywhere             owner UID match 1337
    0     0 ISTIO_IN_REDIRECT  all  --  any    lo      anywhere            !127.0.0.1    owner GID match 1337
    0     0 RETURN     all  --  any    lo      anywhere             anywhere             ! owner GID match 1337
    0     0 RETURN     all  --  any    any     anywhere             anywhere             owner GID match 1337
    0     0 RETURN     all  --  any    any     anywhere             127.0.0.1
    0     0 ISTIO_REDIRECT  all  --  any    any     anywhere             anywhere

Chain ISTIO_REDIRECT (1 references)
 pkts bytes target     prot opt in     out     source               destination
    0     0 REDIRECT   tcp  --  any    any     anywhere             anywhere             redir ports 15001
"""

# The same tables translated by hand into iptables-save form.
SEED_SAVE = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""

SERVICES = {"ssh": "22"}  # the only port name in the seed listing


def listing_to_save(listing: str) -> str:
    """Translate `iptables -L -n -v` text into iptables-save lines (enough of the grammar for the seed)."""
    decls: list[str] = []
    rules: list[str] = []
    chain = ""
    for line in listing.splitlines():
        if not line.strip() or line.lstrip().startswith("pkts"):
            continue
        head = re.match(r"Chain (\S+) \((policy (\S+)|\d+ references)", line)
        if head:
            chain = head.group(1)
            decls.append(f":{chain} {head.group(3) or '-'} [0:0]")
            continue
        cols = line.split()
        target, prot, _opt, in_if, out_if, src, dst = cols[2:9]
        extra = " ".join(cols[9:])
        args: list[str] = []
        for flag, value in (("-s", src), ("-d", dst)):
            if value != "anywhere":
                neg = value.startswith("!")
                addr = value.lstrip("!")
                args += (["!"] if neg else []) + [flag, addr if "/" in addr else f"{addr}/32"]
        if in_if != "any":
            args += ["-i", in_if]
        if out_if != "any":
            args += ["-o", out_if]
        if prot != "all":
            args += ["-p", prot]
        target_args: list[str] = []
        for m in re.finditer(r"(!\s)?owner (UID|GID) match (\d+)|tcp dpt:(\S+)|redir ports (\d+)", extra):
            if m.group(2):
                args += ["-m", "owner"] + (["!"] if m.group(1) else []) + [f"--{m.group(2).lower()}-owner", m.group(3)]
            elif m.group(4):
                args += ["-m", "tcp", "--dport", SERVICES.get(m.group(4), m.group(4))]
            else:
                target_args = ["--to-ports", m.group(5)]
        rules.append(" ".join(["-A", chain, *args, "-j", target, *target_args]))
    return "\n".join(["*nat", *decls, *rules, "COMMIT"]) + "\n"


def dry_run(argv: list[str], monkeypatch=None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    if monkeypatch is not None:
        for name in [e for _s, _l, e, _d in ipt.FLAGS] + ["ENVOY_USER", "ISTIO_META_DNS_CAPTURE", "DRY_RUN"]:
            monkeypatch.delenv(name, raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main([*argv, "--dry-run"], command="iptables")
    return rc, out.getvalue(), err.getvalue()


def test_translated_seed_listing_is_the_hand_written_save_text():
    assert listing_to_save(SEED_LISTING) == SEED_SAVE


def test_seed_command_prints_the_seed_rules(monkeypatch):
    rc, out, err = dry_run(SEED_ARGV, monkeypatch)
    assert rc == 0, err
    assert out == SEED_SAVE
    assert out == listing_to_save(SEED_LISTING)


def test_seed_reference_counts_match_the_listing(monkeypatch):
    _rc, out, _err = dry_run(SEED_ARGV, monkeypatch)
    jumps = re.findall(r" -j (ISTIO_\w+)", out)
    listed = dict(re.findall(r"Chain (ISTIO_\w+) \((\d+) references\)", SEED_LISTING))
    assert {c: str(jumps.count(c)) for c in listed} == listed


# --- other flag combinations -----------------------------------------------------------------------------

NAT_HEAD = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
"""

# ISTIO_OUTPUT's owner block for uid 1337 / gid 1337 (run.go: one triple per uid, then per gid).
OWNER_1337 = """\
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
"""

TPROXY_WILDCARD = (
    """\
# ip -f inet rule add fwmark 1337 lookup 133
# ip -f inet route add local default dev lo table 133
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -s 127.0.0.1/32 ! -d 127.0.0.1/32 -p tcp -j MARK --set-xmark 0x539/0xffffffff
-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15001 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
COMMIT
"""
    + NAT_HEAD
    + """\
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
    + OWNER_1337
    + """\
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

TPROXY_PORTS = (
    """\
# ip -f inet rule add fwmark 1337 lookup 133
# ip -f inet route add local default dev lo table 133
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -s 127.0.0.1/32 ! -d 127.0.0.1/32 -p tcp -j MARK --set-xmark 0x539/0xffffffff
-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m tcp --dport 32000 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -m tcp --dport 32000 -j ISTIO_TPROXY
-A ISTIO_INBOUND -p tcp -m tcp --dport 31000 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -m tcp --dport 31000 -j ISTIO_TPROXY
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15001 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
COMMIT
"""
    + NAT_HEAD
    + """\
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
    + OWNER_1337
    + """\
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

INBOUND_PORT_LIST = (
    NAT_HEAD
    + """\
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 32000 -j ISTIO_IN_REDIRECT
-A ISTIO_INBOUND -p tcp -m tcp --dport 31000 -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
    + OWNER_1337
    + """\
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

# -i 10.0.0.0/8,10.96.0.1/12 -x 1.1.0.0/16,192.168.3.7/32: exclusions first, include ranges normalized to
# their network, then a final RETURN; -d only applies with -b '*', so it is ignored for an empty -b.
CIDRS = (
    NAT_HEAD
    + """\
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
    + OWNER_1337
    + """\
-A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN
-A ISTIO_OUTPUT -d 192.168.3.7/32 -j RETURN
-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -d 10.96.0.0/12 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

# -o 3306,6379 (excluded outbound ports come before the 127.0.0.6 return), -q 32000,31000 (after exclusions).
OUTBOUND_PORTS = (
    NAT_HEAD
    + """\
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN
-A ISTIO_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN
"""
    + OWNER_1337
    + """\
-A ISTIO_OUTPUT -p tcp -m tcp --dport 32000 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -p tcp -m tcp --dport 31000 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

# -u 3,4 -g 1,2 with other ports: one triple per uid, then per gid (golden ip-range without DNS).
UIDS_GIDS = (
    NAT_HEAD
    + """\
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15009 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 3 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 3 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 3 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 4 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 4 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 4 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 2 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 2 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 2 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001
COMMIT
"""
)

# -k eth1,eth2 -i '*' (golden kube-virt-interfaces): the RETURNs are inserted at 1 first, the
# ISTIO_REDIRECT jumps later, each insert landing on top, so the last interface comes first.
KUBEVIRT = (
    NAT_HEAD
    + """\
-A PREROUTING -i eth2 -j ISTIO_REDIRECT
-A PREROUTING -i eth1 -j ISTIO_REDIRECT
-A PREROUTING -i eth2 -j RETURN
-A PREROUTING -i eth1 -j RETURN
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
    + OWNER_1337
    + """\
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

# -k eth1 -i 10.0.0.0/8 (golden ipnets-with-kube-virt-interfaces).
KUBEVIRT_NETS = (
    NAT_HEAD
    + """\
-A PREROUTING -d 10.0.0.0/8 -i eth1 -j ISTIO_REDIRECT
-A PREROUTING -i eth1 -j RETURN
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
    + OWNER_1337
    + """\
-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

# -i 127.0.0.1/32,10.0.0.0/8: loopback included, so the "app to itself over lo" RETURNs are left out.
LOOPBACK_INCLUDED = (
    NAT_HEAD
    + """\
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

# ISTIO_META_DNS_CAPTURE=true (1.8): TCP 53 to the agent first in ISTIO_REDIRECT, UDP 53 DNAT'ed in OUTPUT
# except for the proxy's uid/gid, and SNAT'ed back to 127.0.0.1.
DNS = (
    NAT_HEAD
    + """\
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j RETURN
-A OUTPUT -p udp -m udp --dport 53 -m owner --gid-owner 1337 -j RETURN
-A OUTPUT -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.1:15053
-A POSTROUTING -p udp -m udp --dport 15053 -j SNAT --to-source 127.0.0.1
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
    + OWNER_1337
    + """\
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

# istio 1.8 run_test.go TestRulesWithLoopbackIpInOutboundIpRanges: -i 127.1.2.3/32, DNS capture, -u 3,4 -g 1,2.
LOOPBACK_DNS_IDS = (
    NAT_HEAD
    + """\
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 3 -j RETURN
-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 4 -j RETURN
-A OUTPUT -p udp -m udp --dport 53 -m owner --gid-owner 1 -j RETURN
-A OUTPUT -p udp -m udp --dport 53 -m owner --gid-owner 2 -j RETURN
-A OUTPUT -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.1:15053
-A POSTROUTING -p udp -m udp --dport 15053 -j SNAT --to-source 127.0.0.1
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 3 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -m owner --uid-owner 3 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 4 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -m owner --uid-owner 4 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -m owner --gid-owner 1 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 2 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -m owner --gid-owner 2 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -j RETURN
-A ISTIO_REDIRECT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

# Everything empty: the chains still exist, only OUTPUT jumps (golden "empty").
EMPTY = (
    NAT_HEAD
    + """\
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
    + OWNER_1337
    + """\
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
)

CASES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "tproxy-wildcard": (["-u", "1337", "-m", "TPROXY", "-i", "*", "-b", "*", "-d", "15090,15021,15020"], {},
                        TPROXY_WILDCARD),
    "tproxy-ports": (["-u", "1337", "-m", "TPROXY", "-b", "32000,31000"], {}, TPROXY_PORTS),
    "inbound-port-list": (["-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "32000,31000", "-d", "15090"], {},
                          INBOUND_PORT_LIST),
    "cidrs": (["-u", "1337", "-i", "10.0.0.0/8,10.96.0.1/12", "-x", "1.1.0.0/16,192.168.3.7/32", "-d", "15090"], {},
              CIDRS),
    "outbound-ports": (["-u", "1337", "-i", "*", "-o", "3306,6379", "-q", "32000,31000"], {}, OUTBOUND_PORTS),
    "uids-gids": (["-p", "16001", "-z", "16006", "-e", "15009", "-u", "3,4", "-g", "1,2", "-i", "*", "-b", "*"], {},
                  UIDS_GIDS),
    "kubevirt": (["-u", "1337", "-k", "eth1,eth2", "-i", "*"], {}, KUBEVIRT),
    "kubevirt-nets": (["-u", "1337", "-k", "eth1", "-i", "10.0.0.0/8"], {}, KUBEVIRT_NETS),
    "loopback-included": (["-u", "1337", "-i", "127.0.0.1/32,10.0.0.0/8"], {}, LOOPBACK_INCLUDED),
    "loopback-dns-ids": (["-u", "3,4", "-g", "1,2", "-i", "127.1.2.3/32"], {"ISTIO_META_DNS_CAPTURE": "true"},
                         LOOPBACK_DNS_IDS),
    "dns-capture": (["-u", "1337", "-i", "*"], {"ISTIO_META_DNS_CAPTURE": "true"}, DNS),
    "empty": (["-u", "1337"], {}, EMPTY),
    # Environment fallbacks, named as istio-iptables' viper keys: the seed's flags given as variables.
    "seed-from-env": ([], {"ENVOY_PORT": "15001", "INBOUND_CAPTURE_PORT": "15006", "PROXY_UID": "1337",
                           "ISTIO_INBOUND_INTERCEPTION_MODE": "REDIRECT", "ISTIO_SERVICE_CIDR": "*",
                           "ISTIO_INBOUND_PORTS": "*", "ISTIO_LOCAL_EXCLUDE_PORTS": "15090,15021,15020"}, SEED_SAVE),
    "env-for-everything-else": (["-u", "3,4", "-i", "*", "-b", "*"],
                                {"ENVOY_PORT": "16001", "INBOUND_CAPTURE_PORT": "16006", "INBOUND_TUNNEL_PORT": "15009",
                                 "PROXY_GID": "1,2"}, UIDS_GIDS),
    "env-tproxy": (["-u", "1337"], {"ISTIO_INBOUND_INTERCEPTION_MODE": "TPROXY", "ISTIO_INBOUND_PORTS": "32000,31000",
                                    "ISTIO_INBOUND_TPROXY_MARK": "1337", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE": "133"},
                   TPROXY_PORTS),
    "env-outbound": (["-u", "1337"], {"ISTIO_SERVICE_CIDR": "*", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE": "3306,6379",
                                      "ISTIO_OUTBOUND_PORTS": "32000,31000"}, OUTBOUND_PORTS),
    "env-cidrs-kubevirt": (["-u", "1337"], {"ISTIO_SERVICE_CIDR": "10.0.0.0/8", "KUBE_VIRT_INTERFACES": "eth1"},
                           KUBEVIRT_NETS),
    "env-exclude-cidr": (["-u", "1337", "-i", "10.0.0.0/8,10.96.0.1/12", "-d", "15090"],
                         {"ISTIO_SERVICE_EXCLUDE_CIDR": "1.1.0.0/16,192.168.3.7/32"}, CIDRS),
    # A flag given (even empty) beats the environment.
    "flag-beats-env": (SEED_ARGV, {"ENVOY_PORT": "9", "ISTIO_SERVICE_EXCLUDE_CIDR": "10.0.0.0/8",
                                   "ISTIO_INBOUND_PORTS": "80"}, SEED_SAVE),
}

@pytest.mark.parametrize("name", list(CASES))
def test_flag_combinations_match_istio_iptables(name, monkeypatch):
    argv, env, expected = CASES[name]
    rc, out, err = dry_run(argv, monkeypatch, env)
    assert rc == 0, err
    assert out == expected


def test_proxy_uid_defaults_to_envoy_user_then_1337(monkeypatch):
    # ENVOY_USER names the user whose uid is excluded; root exists everywhere, so uid 0.
    _rc, out, _ = dry_run(["-i", "*"], monkeypatch, {"ENVOY_USER": "root"})
    assert "-m owner --uid-owner 0 -j RETURN" in out and "-m owner --gid-owner 0 -j RETURN" in out
    assert "1337" not in out
    _rc, out, _ = dry_run(["-i", "*"], monkeypatch, {"ENVOY_USER": "no-such-user-mizzen"})
    assert "-m owner --uid-owner 1337 -j RETURN" in out and "-m owner --gid-owner 1337 -j RETURN" in out


def test_dry_run_from_env(monkeypatch, capsys):
    for name in [e for _s, _l, e, _d in ipt.FLAGS]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DRY_RUN", "true")
    assert cli.main(SEED_ARGV, command="iptables") == 0  # would need root and change this namespace otherwise
    assert capsys.readouterr().out == SEED_SAVE


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-m", "NAT"], "-m: 'NAT' must be REDIRECT or TPROXY"),
        (["-p", "http"], "-p: 'http' is not a port"),
        (["-b", "*", "-d", "15090,ssh"], "-d: 'ssh' is not a port"),
        (["-b", "80,70000"], "-b: '70000' is not a port"),
        (["-x", "*"], "-x: '*' is not allowed"),
        (["-u", "no-such-user-mizzen"], "-u: 'no-such-user-mizzen' is neither a numeric id nor a known user"),
        (["-t", "mark"], "-t: 'mark' is not a number"),
    ],
)
def test_bad_values_are_rejected_naming_the_flag(argv, message, monkeypatch):
    rc, out, err = dry_run(argv, monkeypatch)
    assert rc == 2 and out == ""
    assert message in err


def test_unparsable_cidrs_are_skipped_with_a_warning(monkeypatch):
    # istio-iptables ignores what net.ParseCIDR rejects ("bug compatibility"), including a bare address.
    rc, out, err = dry_run(["-u", "1337", "-i", "10.0.0.0/8,10.0.0.1,nonsense"], monkeypatch)
    assert rc == 0
    assert "'10.0.0.1'" in err and "'nonsense'" in err
    assert out.count("-j ISTIO_REDIRECT\n") == 1 and "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT" in out


def test_restore_text_replays_istio_iptables_order():
    """The applied input keeps istio-iptables' call order (inserts land on top of existing rules)."""
    cfg = ipt.resolve_config({"kube-virt-interfaces": "eth1", "istio-service-cidr": "*", "proxy-uid": "1337"}, {})
    lines = ipt.build_rules(cfg).restore_text().splitlines()
    assert lines[:5] == ["*nat", ":ISTIO_INBOUND - [0:0]", ":ISTIO_REDIRECT - [0:0]", ":ISTIO_IN_REDIRECT - [0:0]",
                         ":ISTIO_OUTPUT - [0:0]"]
    assert lines[5] == "-I PREROUTING 1 -i eth1 -j RETURN"
    assert lines[-2] == "-I PREROUTING 1 -i eth1 -j ISTIO_REDIRECT"


def test_cleanup_plan_removes_istio_chains_jumps_and_own_rules_only():
    saved = SEED_SAVE.replace(
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n",
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A OUTPUT -d 10.9.9.9/32 -j RETURN\n"
        "-A OUTPUT -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.1:15053\n",
    )
    dns_rules = ipt.build_rules(ipt.resolve_config({"proxy-uid": "1337"}, {"ISTIO_META_DNS_CAPTURE": "1"}))
    plan = ipt.plan_cleanup(saved, dns_rules.builtin_rules())
    assert plan == (
        "*nat\n"
        "-D PREROUTING -p tcp -j ISTIO_INBOUND\n"
        "-D OUTPUT -p tcp -j ISTIO_OUTPUT\n"
        "-D OUTPUT -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.1:15053\n"
        "-F ISTIO_INBOUND\n-F ISTIO_IN_REDIRECT\n-F ISTIO_OUTPUT\n-F ISTIO_REDIRECT\n"
        "-X ISTIO_INBOUND\n-X ISTIO_IN_REDIRECT\n-X ISTIO_OUTPUT\n-X ISTIO_REDIRECT\n"
        "COMMIT\n"
    )
    assert ipt.plan_cleanup("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j RETURN\nCOMMIT\n") == ""
