"""istio-iptables' traffic-capture rules, built as data.

Mizzen follows istio-iptables of Istio 1.8 (tools/istio-iptables/pkg/cmd/run.go), the release whose output
the seed's `iptables -t nat -L -n -v` listing shows: ISTIO_INBOUND starts with the tunnel port (15008) and
ssh (22), ISTIO_OUTPUT starts with the 127.0.0.6 return. Only the IPv4 tables are built (istio-iptables
writes IPv6 rules only for pods whose address is IPv6).

The core is pure: `resolve_config` turns flags and environment into a `CaptureConfig`, `build_rules` turns
that into a `RuleSet`, which renders itself as `iptables-save` text (what the kernel holds afterwards, the
`--dry-run` output) or as `iptables-restore --noflush` input (istio-iptables' append/insert sequence).
`plan_cleanup` turns an `iptables-save` dump into the restore input that removes what was added. Running
the binaries is left to the small functions at the end, which take a command prefix (e.g. `ip netns exec X`).
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
import subprocess
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

# --- names istio-iptables uses ---------------------------------------------------------------------------

NAT, MANGLE, RAW, FILTER, SECURITY = "nat", "mangle", "raw", "filter", "security"
ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_DIVERT = "ISTIO_DIVERT"
ISTIO_TPROXY = "ISTIO_TPROXY"
CHAIN_PREFIX = "ISTIO_"

REDIRECT, TPROXY = "REDIRECT", "TPROXY"
DNS_AGENT_PORT = 15053  # istio-agent's DNS listener (1.8: constants.IstioAgentDNSListenerPort)

# Built-in chains per table, in the order iptables-save prints them; tables in iptables-nft-save's order.
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    MANGLE: ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    SECURITY: ("INPUT", "FORWARD", "OUTPUT"),
    RAW: ("PREROUTING", "OUTPUT"),
    FILTER: ("INPUT", "FORWARD", "OUTPUT"),
    NAT: ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
TABLE_ORDER = tuple(BUILTIN_CHAINS)

# (flag, long name, environment variable, default) exactly as istio-iptables 1.8 binds them with viper:
# the long name upper-cased with '-' → '_' is the environment fallback. An empty default means "unset".
FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("-p", "envoy-port", "ENVOY_PORT", "15001"),
    ("-z", "inbound-capture-port", "INBOUND_CAPTURE_PORT", "15006"),
    ("-e", "inbound-tunnel-port", "INBOUND_TUNNEL_PORT", "15008"),
    ("-u", "proxy-uid", "PROXY_UID", ""),
    ("-g", "proxy-gid", "PROXY_GID", ""),
    ("-m", "istio-inbound-interception-mode", "ISTIO_INBOUND_INTERCEPTION_MODE", ""),
    ("-t", "istio-inbound-tproxy-mark", "ISTIO_INBOUND_TPROXY_MARK", "1337"),
    ("-r", "istio-inbound-tproxy-route-table", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "133"),
    ("-b", "istio-inbound-ports", "ISTIO_INBOUND_PORTS", ""),
    ("-d", "istio-local-exclude-ports", "ISTIO_LOCAL_EXCLUDE_PORTS", ""),
    ("-i", "istio-service-cidr", "ISTIO_SERVICE_CIDR", ""),
    ("-x", "istio-service-exclude-cidr", "ISTIO_SERVICE_EXCLUDE_CIDR", ""),
    ("-q", "istio-outbound-ports", "ISTIO_OUTBOUND_PORTS", ""),
    ("-o", "istio-local-outbound-ports-exclude", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", ""),
    ("-k", "kube-virt-interfaces", "KUBE_VIRT_INTERFACES", ""),
)
ENVOY_USER_ENV = "ENVOY_USER"  # whose uid is the default for -u (istio-proxy), else 1337
DEFAULT_ENVOY_USER = "istio-proxy"
DEFAULT_PROXY_UID = "1337"
DNS_CAPTURE_ENV = "ISTIO_META_DNS_CAPTURE"  # 1.8: true → capture DNS (port 53) to the agent on 15053


class IptablesConfigError(ValueError):
    """A flag or environment value istio-iptables would choke on; the message names the flag."""


@dataclass(frozen=True)
class CaptureConfig:
    """istio-iptables' config.Config, the fields it reads, as strings the way it keeps them."""

    proxy_port: str = "15001"
    inbound_capture_port: str = "15006"
    inbound_tunnel_port: str = "15008"
    proxy_uid: str = DEFAULT_PROXY_UID
    proxy_gid: str = DEFAULT_PROXY_UID
    inbound_interception_mode: str = ""
    inbound_tproxy_mark: str = "1337"
    inbound_tproxy_route_table: str = "133"
    inbound_ports_include: str = ""
    inbound_ports_exclude: str = ""
    outbound_ip_ranges_include: str = ""
    outbound_ip_ranges_exclude: str = ""
    outbound_ports_include: str = ""
    outbound_ports_exclude: str = ""
    kubevirt_interfaces: str = ""
    redirect_dns: bool = False

    @property
    def tproxy(self) -> bool:
        return self.inbound_interception_mode == TPROXY


_FIELD_BY_LONG = {
    "envoy-port": "proxy_port",
    "inbound-capture-port": "inbound_capture_port",
    "inbound-tunnel-port": "inbound_tunnel_port",
    "proxy-uid": "proxy_uid",
    "proxy-gid": "proxy_gid",
    "istio-inbound-interception-mode": "inbound_interception_mode",
    "istio-inbound-tproxy-mark": "inbound_tproxy_mark",
    "istio-inbound-tproxy-route-table": "inbound_tproxy_route_table",
    "istio-inbound-ports": "inbound_ports_include",
    "istio-local-exclude-ports": "inbound_ports_exclude",
    "istio-service-cidr": "outbound_ip_ranges_include",
    "istio-service-exclude-cidr": "outbound_ip_ranges_exclude",
    "istio-outbound-ports": "outbound_ports_include",
    "istio-local-outbound-ports-exclude": "outbound_ports_exclude",
    "kube-virt-interfaces": "kubevirt_interfaces",
}


def parse_go_bool(value: str | None) -> bool:
    # strconv.ParseBool; anything else falls back to the default (false), as istio's env.RegisterBoolVar does.
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _default_proxy_uid(environ: Mapping[str, str]) -> str:
    user = environ.get(ENVOY_USER_ENV) or DEFAULT_ENVOY_USER
    try:
        return str(pwd.getpwnam(user).pw_uid)
    except KeyError:
        return DEFAULT_PROXY_UID


def resolve_config(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> CaptureConfig:
    """Flags (by long name; None = not given) win, then a non-empty environment variable, then the default.

    A flag given as an empty string counts as given (`-x ""` overrides $ISTIO_SERVICE_EXCLUDE_CIDR), as
    with pflag/viper."""
    values: dict[str, object] = {}
    for _short, long, env_name, default in FLAGS:
        given = flags.get(long)
        if given is None:
            given = environ.get(env_name) or default
        values[_FIELD_BY_LONG[long]] = given
    if not values["proxy_uid"]:
        values["proxy_uid"] = _default_proxy_uid(environ)
    if not values["proxy_gid"]:
        values["proxy_gid"] = values["proxy_uid"]  # "For TPROXY as its uid and gid are same."
    values["redirect_dns"] = parse_go_bool(environ.get(DNS_CAPTURE_ENV))
    cfg = CaptureConfig(**values)  # type: ignore[arg-type]
    validate(cfg)
    return cfg


# --- value checks and canonical forms (the way iptables-save prints them) --------------------------------


def split_list(value: str) -> list[str]:
    """istio-iptables' split(): comma-separated, empty items dropped (we also trim blanks)."""
    return [s.strip() for s in value.split(",") if s.strip()]


_PORT_RE = re.compile(r"^(\d+)(?::(\d+))?$")


def _port(value: str, flag: str) -> str:
    m = _PORT_RE.match(value.strip())
    if not m or any(int(g) > 65535 for g in m.groups() if g is not None):
        raise IptablesConfigError(f"{flag}: {value!r} is not a port (0-65535) or a range like 15090:15099")
    lo, hi = m.groups()
    return f"{int(lo)}:{int(hi)}" if hi is not None else str(int(lo))


def _single_port(value: str, flag: str) -> str:
    if not value.strip().isdigit() or int(value) > 65535:
        raise IptablesConfigError(f"{flag}: {value!r} is not a port (0-65535)")
    return str(int(value))


def _owner_id(value: str, flag: str, group: bool) -> str:
    v = value.strip()
    if re.fullmatch(r"\d+(-\d+)?", v):
        return "-".join(str(int(x)) for x in v.split("-"))
    try:  # iptables resolves names; iptables-save prints the number
        return str(grp.getgrnam(v).gr_gid if group else pwd.getpwnam(v).pw_uid)
    except KeyError:
        raise IptablesConfigError(f"{flag}: {value!r} is neither a numeric id nor a known {'group' if group else 'user'}") from None


def _mark(value: str, flag: str) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise IptablesConfigError(f"{flag}: {value!r} is not a number") from None
    if not 0 <= n <= 0xFFFFFFFF:
        raise IptablesConfigError(f"{flag}: {value!r} does not fit in 32 bits")
    return n


def validate(cfg: CaptureConfig) -> None:
    _single_port(cfg.proxy_port, "-p")
    _single_port(cfg.inbound_capture_port, "-z")
    _port(cfg.inbound_tunnel_port, "-e")
    if cfg.inbound_interception_mode not in ("", REDIRECT, TPROXY):
        raise IptablesConfigError(f"-m: {cfg.inbound_interception_mode!r} must be REDIRECT or TPROXY")
    _mark(cfg.inbound_tproxy_mark, "-t")
    if not cfg.inbound_tproxy_route_table.strip().isdigit():
        raise IptablesConfigError(f"-r: {cfg.inbound_tproxy_route_table!r} is not a routing table number")
    for flag, value in (("-d", cfg.inbound_ports_exclude), ("-q", cfg.outbound_ports_include), ("-o", cfg.outbound_ports_exclude)):
        for p in split_list(value):
            _port(p, flag)
    if cfg.inbound_ports_include != "*":
        for p in split_list(cfg.inbound_ports_include):
            _port(p, "-b")
    for uid in split_list(cfg.proxy_uid):
        _owner_id(uid, "-u", group=False)
    for gid in split_list(cfg.proxy_gid):
        _owner_id(gid, "-g", group=True)
    if cfg.outbound_ip_ranges_exclude.strip() == "*":
        raise IptablesConfigError("-x: '*' is not allowed (istio-iptables: Invalid value for OUTBOUND_IP_RANGES_EXCLUDE)")
    for iface in split_list(cfg.kubevirt_interfaces):
        if not re.fullmatch(r"[A-Za-z0-9_.@:+-]{1,15}", iface):
            raise IptablesConfigError(f"-k: {iface!r} is not an interface name")


@dataclass
class NetworkRange:
    """istio-iptables' NetworkRange for one address family."""

    wildcard: bool = False
    nets: list[str] = field(default_factory=list)  # canonical "a.b.c.d/n"
    has_loopback: bool = False
    ignored: list[str] = field(default_factory=list)  # unparsable items istio-iptables skips with a warning


def separate_v4_v6(cidrs: str) -> tuple[NetworkRange, NetworkRange]:
    if cidrs == "*":
        return NetworkRange(wildcard=True), NetworkRange(wildcard=True)
    v4, v6 = NetworkRange(), NetworkRange()
    for item in split_list(cidrs):
        # Go's net.ParseCIDR: the prefix length is required; "10.0.0.1" alone is an error that is skipped.
        try:
            if "/" not in item:
                raise ValueError(item)
            iface = ipaddress.ip_interface(item)
        except ValueError:
            v4.ignored.append(item)
            continue
        target = v4 if iface.version == 4 else v6
        target.nets.append(str(iface.network))
        if iface.ip.is_loopback:
            target.has_loopback = True
    return v4, v6


# --- rules -----------------------------------------------------------------------------------------------


def spec(
    *,
    src: str | None = None,
    dst: str | None = None,
    not_dst: str | None = None,
    in_iface: str | None = None,
    out_iface: str | None = None,
    proto: str | None = None,
    matches: Sequence[str] = (),
    jump: str,
    jump_args: Sequence[str] = (),
) -> str:
    """A rule's arguments in the canonical order iptables-save prints them:
    -s, -d, -i, -o, -p, then the matches in the order given, then -j and the target's options."""
    parts: list[str] = []
    if src:
        parts += ["-s", src]
    if dst:
        parts += ["-d", dst]
    if not_dst:
        parts += ["!", "-d", not_dst]
    if in_iface:
        parts += ["-i", in_iface]
    if out_iface:
        parts += ["-o", out_iface]
    if proto:
        parts += ["-p", proto]
    parts += list(matches)
    parts += ["-j", jump, *jump_args]
    return " ".join(parts)


def dport(proto: str, port: str, negate: bool = False) -> str:
    # `-p tcp --dport N` loads the tcp match implicitly; iptables-save shows it as `-m tcp --dport N`.
    return f"-m {proto} {'! ' if negate else ''}--dport {port}"


def owner(kind: str, ident: str, negate: bool = False) -> str:
    return f"-m owner {'! ' if negate else ''}--{kind}-owner {ident}"


@dataclass(frozen=True)
class Op:
    """One istio-iptables builder call: append a rule, or insert it at a position (1-based)."""

    table: str
    chain: str
    rule: str
    position: int | None = None  # None = append

    def restore_line(self) -> str:
        if self.position is None:
            return f"-A {self.chain} {self.rule}"
        return f"-I {self.chain} {self.position} {self.rule}"


@dataclass
class RuleSet:
    ops: list[Op] = field(default_factory=list)
    ip_commands: list[list[str]] = field(default_factory=list)  # TPROXY policy routing, run before the rules
    warnings: list[str] = field(default_factory=list)

    def append(self, table: str, chain: str, rule: str) -> None:
        self.ops.append(Op(table, chain, rule))

    def insert(self, table: str, chain: str, position: int, rule: str) -> None:
        self.ops.append(Op(table, chain, rule, position))

    # The state the ops leave behind in otherwise empty tables.
    def tables(self) -> list[str]:
        used = {op.table for op in self.ops}
        return [t for t in TABLE_ORDER if t in used]

    def user_chains(self, table: str) -> list[str]:
        """Chains istio-iptables creates (`-N`) in this table, in creation order."""
        seen: list[str] = []
        for op in self.ops:
            if op.table == table and op.chain not in BUILTIN_CHAINS[table] and op.chain not in seen:
                seen.append(op.chain)
        return seen

    def chain_rules(self, table: str) -> dict[str, list[str]]:
        chains: dict[str, list[str]] = {c: [] for c in BUILTIN_CHAINS[table]}
        for c in self.user_chains(table):
            chains[c] = []
        for op in self.ops:
            if op.table != table:
                continue
            rules = chains[op.chain]
            if op.position is None:
                rules.append(op.rule)
            else:
                rules.insert(op.position - 1, op.rule)
        return chains

    def builtin_rules(self) -> set[tuple[str, str, str]]:
        """(table, chain, rule) for every rule placed in a built-in chain (what cleanup must take out again)."""
        return {(op.table, op.chain, op.rule) for op in self.ops if op.chain in BUILTIN_CHAINS[op.table]}

    def save_text(self) -> str:
        """`iptables-save` text of the tables after the rules are applied to empty tables: `*table`, chain
        declarations (built-ins with policy ACCEPT, user chains sorted as iptables-save sorts them), each
        chain's rules in istio-iptables' order, `COMMIT`. Policy routing commands come first as comments."""
        lines = [f"# {' '.join(cmd)}" for cmd in self.ip_commands]
        for table in self.tables():
            chains = self.chain_rules(table)
            builtins = list(BUILTIN_CHAINS[table])
            users = sorted(c for c in chains if c not in BUILTIN_CHAINS[table])
            lines.append(f"*{table}")
            lines += [f":{c} ACCEPT [0:0]" for c in builtins]
            lines += [f":{c} - [0:0]" for c in users]
            for c in builtins + users:
                lines += [f"-A {c} {r}" for r in chains[c]]
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def restore_text(self) -> str:
        """Input for `iptables-restore --noflush`: declares the ISTIO_* chains and replays istio-iptables'
        appends and inserts in its order, leaving other rules in the built-in chains alone."""
        lines: list[str] = []
        for table in self.tables():
            lines.append(f"*{table}")
            lines += [f":{c} - [0:0]" for c in self.user_chains(table)]
            lines += [op.restore_line() for op in self.ops if op.table == table]
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def build_rules(cfg: CaptureConfig) -> RuleSet:
    """istio-iptables 1.8 `run()` for IPv4, call for call."""
    validate(cfg)
    rs = RuleSet()
    v4_exclude, _v6_exclude = separate_v4_v6(cfg.outbound_ip_ranges_exclude)
    v4_include, v6_include = separate_v4_v6(cfg.outbound_ip_ranges_include)
    for bad in v4_exclude.ignored + v4_include.ignored:
        rs.warnings.append(f"ignoring {bad!r}: not an address range in CIDR form (istio-iptables skips it too)")

    proxy_port = _single_port(cfg.proxy_port, "-p")
    capture_port = _single_port(cfg.inbound_capture_port, "-z")
    tunnel_port = _port(cfg.inbound_tunnel_port, "-e")
    uids = [_owner_id(u, "-u", group=False) for u in split_list(cfg.proxy_uid)]
    gids = [_owner_id(g, "-g", group=True) for g in split_list(cfg.proxy_gid)]
    kubevirt = split_list(cfg.kubevirt_interfaces)
    mark = _mark(cfg.inbound_tproxy_mark, "-t")
    mark_hex = f"{mark:#x}/0xffffffff"
    loopback_included = v4_include.has_loopback or v6_include.has_loopback

    # Traffic arriving on a KubeVirt VM interface is not inbound capture.
    for iface in kubevirt:
        rs.insert(NAT, "PREROUTING", 1, spec(in_iface=iface, jump="RETURN"))

    # The tunnel port goes straight to Envoy, never through the inbound capture.
    rs.append(NAT, ISTIO_INBOUND, spec(proto="tcp", matches=[dport("tcp", tunnel_port)], jump="RETURN"))
    if cfg.redirect_dns:
        rs.append(NAT, ISTIO_REDIRECT, spec(proto="tcp", matches=[dport("tcp", "53")], jump="REDIRECT",
                                           jump_args=["--to-ports", str(DNS_AGENT_PORT)]))
    rs.append(NAT, ISTIO_REDIRECT, spec(proto="tcp", jump="REDIRECT", jump_args=["--to-ports", proxy_port]))
    rs.append(NAT, ISTIO_IN_REDIRECT, spec(proto="tcp", jump="REDIRECT", jump_args=["--to-ports", capture_port]))

    _inbound(rs, cfg, proxy_port, mark, mark_hex)

    rs.append(NAT, "OUTPUT", spec(proto="tcp", jump=ISTIO_OUTPUT))
    for port in split_list(cfg.outbound_ports_exclude):
        rs.append(NAT, ISTIO_OUTPUT, spec(proto="tcp", matches=[dport("tcp", _port(port, "-o"))], jump="RETURN"))
    # Envoy's inbound passthrough connects from 127.0.0.6: never capture it again.
    rs.append(NAT, ISTIO_OUTPUT, spec(src="127.0.0.6/32", out_iface="lo", jump="RETURN"))
    for kind, ids in (("uid", uids), ("gid", gids)):
        for ident in ids:
            # Envoy calling its own pod through a service VIP comes back in through the inbound capture.
            rs.append(NAT, ISTIO_OUTPUT, spec(not_dst="127.0.0.1/32", out_iface="lo",
                                              matches=[owner(kind, ident)], jump=ISTIO_IN_REDIRECT))
            # The app talking to itself over lo is left alone (unless loopback is listed in -i).
            if not loopback_included:
                rs.append(NAT, ISTIO_OUTPUT, spec(out_iface="lo", matches=[owner(kind, ident, negate=True)],
                                                  jump="RETURN"))
            # Envoy's own upstream connections are never captured (no loops).
            rs.append(NAT, ISTIO_OUTPUT, spec(matches=[owner(kind, ident)], jump="RETURN"))
    rs.append(NAT, ISTIO_OUTPUT, spec(dst="127.0.0.1/32", jump="RETURN"))
    for net in v4_exclude.nets:
        rs.append(NAT, ISTIO_OUTPUT, spec(dst=net, jump="RETURN"))
    for port in split_list(cfg.outbound_ports_include):
        rs.append(NAT, ISTIO_OUTPUT, spec(proto="tcp", matches=[dport("tcp", _port(port, "-q"))], jump=ISTIO_REDIRECT))

    if v4_include.wildcard:
        rs.append(NAT, ISTIO_OUTPUT, spec(jump=ISTIO_REDIRECT))
        for iface in kubevirt:
            rs.insert(NAT, "PREROUTING", 1, spec(in_iface=iface, jump=ISTIO_REDIRECT))
    elif v4_include.nets:
        for net in v4_include.nets:
            for iface in kubevirt:
                rs.insert(NAT, "PREROUTING", 1, spec(dst=net, in_iface=iface, jump=ISTIO_REDIRECT))
            rs.append(NAT, ISTIO_OUTPUT, spec(dst=net, jump=ISTIO_REDIRECT))
        rs.append(NAT, ISTIO_OUTPUT, spec(jump="RETURN"))

    if cfg.redirect_dns:
        for kind, ids in (("uid", uids), ("gid", gids)):
            for ident in ids:
                rs.append(NAT, "OUTPUT", spec(proto="udp", matches=[dport("udp", "53"), owner(kind, ident)],
                                              jump="RETURN"))
        rs.append(NAT, "OUTPUT", spec(proto="udp", matches=[dport("udp", "53")], jump="DNAT",
                                      jump_args=["--to-destination", f"127.0.0.1:{DNS_AGENT_PORT}"]))
        rs.append(NAT, "POSTROUTING", spec(proto="udp", matches=[dport("udp", str(DNS_AGENT_PORT))], jump="SNAT",
                                           jump_args=["--to-source", "127.0.0.1"]))

    if cfg.tproxy:
        rs.append(MANGLE, "OUTPUT", spec(src="127.0.0.1/32", not_dst="127.0.0.1/32", proto="tcp", jump="MARK",
                                         jump_args=["--set-xmark", mark_hex]))
    return rs


def _inbound(rs: RuleSet, cfg: CaptureConfig, proxy_port: str, mark: int, mark_hex: str) -> None:
    """handleInboundPortsInclude: nothing when -b is empty; `*` captures all but ssh and -d; else a list."""
    include = cfg.inbound_ports_include
    if not include:
        return
    if cfg.tproxy:
        # Mark inbound packets of established connections and route them to lo (policy routing below);
        # new connections go to Envoy with TPROXY. Istio 1.8 sends them to the -p port (1.9 changed it to -z).
        rs.append(MANGLE, ISTIO_DIVERT, spec(jump="MARK", jump_args=["--set-xmark", mark_hex]))
        rs.append(MANGLE, ISTIO_DIVERT, spec(jump="ACCEPT"))
        table_no = cfg.inbound_tproxy_route_table.strip()
        rs.ip_commands.append(["ip", "-f", "inet", "rule", "add", "fwmark", str(mark), "lookup", table_no])
        rs.ip_commands.append(["ip", "-f", "inet", "route", "add", "local", "default", "dev", "lo", "table", table_no])
        rs.append(MANGLE, ISTIO_TPROXY, spec(not_dst="127.0.0.1/32", proto="tcp", jump="TPROXY",
                                             jump_args=["--on-port", proxy_port, "--on-ip", "0.0.0.0",
                                                        "--tproxy-mark", mark_hex]))
        table = MANGLE
    else:
        table = NAT
    rs.append(table, "PREROUTING", spec(proto="tcp", jump=ISTIO_INBOUND))
    established = "-m conntrack --ctstate RELATED,ESTABLISHED"
    if include == "*":
        rs.append(table, ISTIO_INBOUND, spec(proto="tcp", matches=[dport("tcp", "22")], jump="RETURN"))  # keep ssh
        for port in split_list(cfg.inbound_ports_exclude):
            rs.append(table, ISTIO_INBOUND, spec(proto="tcp", matches=[dport("tcp", _port(port, "-d"))], jump="RETURN"))
        if cfg.tproxy:
            rs.append(MANGLE, ISTIO_INBOUND, spec(proto="tcp", matches=[established], jump=ISTIO_DIVERT))
            rs.append(MANGLE, ISTIO_INBOUND, spec(proto="tcp", jump=ISTIO_TPROXY))
        else:
            rs.append(NAT, ISTIO_INBOUND, spec(proto="tcp", jump=ISTIO_IN_REDIRECT))
        return
    for raw_port in split_list(include):
        port = _port(raw_port, "-b")
        if cfg.tproxy:
            rs.append(MANGLE, ISTIO_INBOUND, spec(proto="tcp", matches=[dport("tcp", port), established],
                                                  jump=ISTIO_DIVERT))
            rs.append(MANGLE, ISTIO_INBOUND, spec(proto="tcp", matches=[dport("tcp", port)], jump=ISTIO_TPROXY))
        else:
            rs.append(NAT, ISTIO_INBOUND, spec(proto="tcp", matches=[dport("tcp", port)], jump=ISTIO_IN_REDIRECT))


# --- reading iptables-save and planning the cleanup -------------------------------------------------------


@dataclass
class SavedTable:
    name: str
    chains: list[str] = field(default_factory=list)  # declared, in order
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, rule spec) in order


def parse_save(text: str) -> dict[str, SavedTable]:
    """The tables of an `iptables-save` dump (comments and counters dropped)."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable(line[1:]))
        elif line == "COMMIT":
            current = None
        elif current is None:
            raise ValueError(f"iptables-save line outside a table: {raw!r}")
        elif line.startswith(":"):
            current.chains.append(line[1:].split()[0])
        elif line.startswith("[") and "] -A " in line:  # iptables-save -c puts counters first
            chain, _, rule = line.split("] -A ", 1)[1].partition(" ")
            current.rules.append((chain, rule))
        elif line.startswith("-A "):
            chain, _, rule = line[3:].partition(" ")
            current.rules.append((chain, rule))
    return tables


def normalize_save(text: str) -> str:
    """An `iptables-save` dump without comments and with every counter zeroed, for comparing."""
    out = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        if line.startswith(":"):
            line = re.sub(r"\[\d+:\d+\]$", "[0:0]", line)
        out.append(line)
    return "\n".join(out) + "\n"


def _jump_target(rule: str) -> str | None:
    m = re.search(r"(?:^|\s)-[jg] (\S+)", rule)
    return m.group(1) if m else None


def plan_cleanup(saved: str, also_remove: AbstractSet[tuple[str, str, str]] = frozenset()) -> str:
    """iptables-restore --noflush input that removes every ISTIO_* chain, every rule elsewhere that jumps
    to one, and the (table, chain, rule) triples in also_remove (the other rules a RuleSet put into built-in
    chains: DNS, TPROXY mark, KubeVirt returns). Empty when there is nothing to remove."""
    extra = also_remove
    lines: list[str] = []
    for name, table in parse_save(saved).items():
        istio_chains = [c for c in table.chains if c.startswith(CHAIN_PREFIX)]
        deletes = [
            f"-D {chain} {rule}"
            for chain, rule in table.rules
            if not chain.startswith(CHAIN_PREFIX)
            and ((_jump_target(rule) or "").startswith(CHAIN_PREFIX) or (name, chain, rule) in extra)
        ]
        if not istio_chains and not deletes:
            continue
        lines.append(f"*{name}")
        lines += deletes
        lines += [f"-F {c}" for c in istio_chains]
        lines += [f"-X {c}" for c in istio_chains]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def istio_chains_present(saved: str) -> list[str]:
    return [f"{t.name}/{c}" for t in parse_save(saved).values() for c in t.chains if c.startswith(CHAIN_PREFIX)]


# --- running the binaries ---------------------------------------------------------------------------------


class IptablesRunError(RuntimeError):
    pass


def _run(prefix: Sequence[str], argv: Sequence[str], stdin: str | None = None, check: bool = True,
         timeout: float = 30.0) -> subprocess.CompletedProcess:
    cmd = [*prefix, *argv]
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise IptablesRunError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def save(prefix: Sequence[str] = ()) -> str:
    return _run(prefix, ["iptables-save"]).stdout


def cleanup(cfg: CaptureConfig | None = None, prefix: Sequence[str] = ()) -> str:
    """Remove what `apply` added; returns the restore input it used ("" when there was nothing).

    ISTIO_* chains and every jump to them go whatever the flags; the other built-in-chain rules (DNS
    capture, KubeVirt returns, the TPROXY mark) are recognised by rebuilding them from `cfg`. When the
    mangle table shows TPROXY chains, the TPROXY rules and policy routing for cfg's mark and table go too."""
    cfg = cfg or CaptureConfig()
    saved = save(prefix)
    tproxy_seen = any(t.name == MANGLE and {ISTIO_DIVERT, ISTIO_TPROXY} & set(t.chains)
                      for t in parse_save(saved).values())
    extra = build_rules(cfg).builtin_rules()
    if tproxy_seen and not cfg.tproxy:
        extra |= build_rules(replace(cfg, inbound_interception_mode=TPROXY)).builtin_rules()
    plan = plan_cleanup(saved, extra)
    if plan:
        _run(prefix, ["iptables-restore", "--noflush"], stdin=plan)
    if tproxy_seen or cfg.tproxy:
        _remove_tproxy_routing(prefix, cfg.inbound_tproxy_mark, cfg.inbound_tproxy_route_table.strip())
    return plan


def _remove_tproxy_routing(prefix: Sequence[str], mark: str, route_table: str) -> None:
    want = f"fwmark {_mark(mark, '-t'):#x} lookup {route_table}"
    for _ in range(16):  # one rule per earlier apply; bounded
        rules = _run(prefix, ["ip", "-f", "inet", "rule", "show"], check=False).stdout
        if want not in rules:
            break
        _run(prefix, ["ip", "-f", "inet", "rule", "del", "fwmark", str(_mark(mark, "-t")), "lookup", route_table], check=False)
    _run(prefix, ["ip", "-f", "inet", "route", "flush", "table", route_table], check=False)


def apply(cfg: CaptureConfig, prefix: Sequence[str] = ()) -> RuleSet:
    """Install cfg's rules in the network namespace `prefix` runs in. Earlier ISTIO_* state is removed
    first, so applying again replaces rather than duplicates (istio-iptables itself would fail on `-N`)."""
    rules = build_rules(cfg)
    if istio_chains_present(save(prefix)):
        cleanup(cfg, prefix)
    for cmd in rules.ip_commands:
        res = _run(prefix, cmd, check=False)
        if res.returncode != 0 and "File exists" not in res.stderr:
            raise IptablesRunError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    _run(prefix, ["iptables-restore", "--noflush"], stdin=rules.restore_text())
    return rules
