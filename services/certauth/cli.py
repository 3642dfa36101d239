"""`mizzen ca …` and `mizzen token`: the CA's command line.

    mizzen ca init [--key-type ec|rsa]             create the self-signed root in the data dir (certauth does it too)
    mizzen ca root [--ca HOST:PORT]                the trust bundle, PEM (from the data dir, or a running CA)
    mizzen ca sign --csr FILE --token T            have certauth sign a CSR (the agent's call); prints the chain
    mizzen ca rotate add|activate|retire|status    root rotation in the data dir; replicas follow within seconds
    mizzen token --namespace NS --service-account SA [--ttl D]   a workload token, alone on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from mizzen.services.mesh import settings

from . import ca, tokens


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="state dir ($MIZZEN_DATA_DIR, default ~/.mizzen)")


def _remote(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root-cert", default=None,
                   help="PEM roots that verify certauth's TLS (default: <data-dir>/ca/trust-bundle.pem)")
    p.add_argument("--server-name", default=None, help="name to check on certauth's certificate")


def _roots_for_tls(args) -> str:
    path = Path(args.root_cert) if args.root_cert else ca.ca_dir(settings.data_dir(args.data_dir)) / "trust-bundle.pem"
    try:
        return path.read_text()
    except OSError as e:
        raise SystemExit(f"mizzen ca: cannot read the roots that verify certauth ({path}: {e.strerror}); "
                         "give --root-cert FILE") from None


def ca_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="The mesh CA: trust bundle, signing, root rotation.")
    sub = p.add_subparsers(dest="action", required=True)

    init = sub.add_parser("init", help="create the self-signed root (kept if it exists)")
    _common(init)
    init.add_argument("--trust-domain", default=settings.env("MIZZEN_TRUST_DOMAIN", settings.TRUST_DOMAIN))
    init.add_argument("--key-type", choices=ca.KEY_TYPES, default="ec")

    root = sub.add_parser("root", help="print the trust bundle (every trusted root), PEM")
    _common(root)
    root.add_argument("--ca", default=None, help="ask a running certauth at HOST:PORT instead of reading files "
                      "(else $MIZZEN_CA when set)")
    root.add_argument("--plugin-ca-dir", default=None, help="read root-cert.pem of this plug-in CA dir")
    _remote(root)

    sign = sub.add_parser("sign", help="have certauth sign a CSR; prints the chain (leaf first, root last)")
    _common(sign)
    sign.add_argument("--csr", required=True, help="PEM CSR file ('-' for stdin)")
    tok = sign.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token", help="workload token")
    tok.add_argument("--token-file", help="file holding the workload token")
    sign.add_argument("--ttl", default=None, help="validity to ask for (e.g. 1h, 3600, 2d); default: the CA's")
    sign.add_argument("--ca", default=None, help="certauth HOST:PORT ($MIZZEN_CA, default 127.0.0.1:8060)")
    _remote(sign)

    rot = sub.add_parser("rotate", help="root rotation: add a root, activate it, retire the old one")
    rsub = rot.add_subparsers(dest="phase", required=True)
    add = rsub.add_parser("add", help="create a new root; trusted by all, the current root still signs")
    add.add_argument("--key-type", choices=ca.KEY_TYPES, default="ec")
    act = rsub.add_parser("activate", help="sign new certificates with the newest (or the given) root")
    act.add_argument("root_id", nargs="?")
    ret = rsub.add_parser("retire", help="stop trusting every root but the signing one (or the given root)")
    ret.add_argument("root_id", nargs="?")
    st = rsub.add_parser("status", help="list the roots")
    for sp in (add, act, ret, st):
        _common(sp)
    return p


def ca_main(argv: list[str], command: str = "ca") -> int:
    args = ca_parser(f"mizzen {command}").parse_args(argv)
    data_dir = settings.data_dir(args.data_dir)
    try:
        if args.action == "init":
            ca.ensure_self_signed(data_dir, args.trust_domain, args.key_type)
            tokens.ensure_key(data_dir)
            print(ca.ca_dir(data_dir) / "trust-bundle.pem")
            return 0
        if args.action == "root":
            return _root(args, data_dir)
        if args.action == "sign":
            return _sign(args)
        return _rotate(args, data_dir)
    except (ca.CAError, tokens.TokenError, ValueError, OSError) as e:
        print(f"mizzen {command}: {e}", file=sys.stderr)
        return 1


def _root(args, data_dir: Path) -> int:
    address = args.ca or settings.env("MIZZEN_CA", "")
    if args.plugin_ca_dir:
        sys.stdout.write((Path(args.plugin_ca_dir) / "root-cert.pem").read_text())
        return 0
    if address:
        from .client import CertAuthError, close_all, trust_bundle

        async def fetch() -> list[str]:
            try:
                return await trust_bundle(address, root_certs_pem=_roots_for_tls(args), server_name=args.server_name)
            finally:
                await close_all()

        try:
            roots = asyncio.run(fetch())
        except CertAuthError as e:
            print(f"mizzen ca root: {address}: {e}", file=sys.stderr)
            return 1
        sys.stdout.write("".join(roots))
        return 0
    path = ca.ca_dir(data_dir) / "trust-bundle.pem"
    if not path.exists():
        raise ca.CAError(f"{path}: no CA in {data_dir} (start `mizzen certauth` or run `mizzen ca init`)")
    sys.stdout.write(path.read_text())
    return 0


def _sign(args) -> int:
    from .client import CertAuthError, close_all, create_certificate

    csr_pem = sys.stdin.read() if args.csr == "-" else Path(args.csr).read_text()
    token = args.token if args.token is not None else Path(args.token_file).read_text().strip()
    ttl = ca.parse_ttl(args.ttl) if args.ttl else None
    address = settings.ca_address(args.ca)

    async def call() -> list[str]:
        try:
            return await create_certificate(address, csr_pem=csr_pem, token=token, root_certs_pem=_roots_for_tls(args),
                                            validity_seconds=ttl, server_name=args.server_name)
        finally:
            await close_all()

    try:
        chain = asyncio.run(call())
    except CertAuthError as e:
        print(f"mizzen ca sign: {address}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(chain))
    return 0


def _rotate(args, data_dir: Path) -> int:
    if args.phase == "add":
        rid = ca.rotate_add(data_dir, args.key_type)
        print(f"added {rid}: trusted now, not signing yet; next: mizzen ca rotate activate {rid}")
    elif args.phase == "activate":
        rid = ca.rotate_activate(data_dir, args.root_id)
        print(f"activated {rid}: new certificates are signed by it")
    elif args.phase == "retire":
        retired = ca.rotate_retire(data_dir, args.root_id)
        print(f"retired {', '.join(retired) or 'nothing'}")
    status = ca.roots_status(data_dir)
    print(f"{'ROOT':<10} {'SIGNING':<8} {'TRUSTED':<8} {'KEY':<4} {'NOT AFTER':<20} SHA256")
    for r in status:
        print(f"{r.id:<10} {'yes' if r.signing else '':<8} {'yes' if r.trusted else '':<8} {r.key_type:<4} "
              f"{r.not_after:%Y-%m-%dT%H:%M:%SZ}  {r.sha256}")
    return 0


def token_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Print a Mizzen workload token (alone, on stdout).")
    _common(p)
    p.add_argument("--namespace", "-n", required=True)
    p.add_argument("--service-account", "--sa", required=True)
    p.add_argument("--ttl", default="24h", help="lifetime (e.g. 12h, 3600, 7d; default 24h)")
    p.add_argument("--audience", default=tokens.DEFAULT_AUDIENCE)
    return p


def token_main(argv: list[str], command: str = "token") -> int:
    args = token_parser(f"mizzen {command}").parse_args(argv)
    try:
        ttl = ca.parse_ttl(args.ttl)
        print(tokens.issue(settings.data_dir(args.data_dir), args.namespace, args.service_account, ttl,
                           audience=args.audience))
    except (ValueError, tokens.TokenError, OSError) as e:
        print(f"mizzen {command}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, command: str = "ca") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if command == "token":
        return token_main(argv, command)
    return ca_main(argv, command)
