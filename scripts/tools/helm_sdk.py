#!/usr/bin/env python3
"""`helm lint` and `helm template` for the chart tests, on Helm's Go SDK as packaged on PyPI
(helm-python-sdk). A real `helm` on PATH takes precedence in scripts/test.sh."""
import sys, yaml, helm_python as helm

def merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v
    return a

def parse(args):
    pos, files, ns, strict, kube = [], [], None, False, None
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-f", "--values"):
            files.append(args[i + 1]); i += 2; continue
        if a in ("-n", "--namespace"):
            ns = args[i + 1]; i += 2; continue
        if a == "--kube-version":
            kube = args[i + 1]; i += 2; continue
        if a == "--strict":
            strict = True; i += 1; continue
        pos.append(a); i += 1
    vals = {}
    for f in files:
        merge(vals, yaml.safe_load(open(f)) or {})
    return pos, vals, ns, strict, kube

cmd, rest = sys.argv[1], sys.argv[2:]
if cmd == "version":
    print(helm.helm_sdk_version()); sys.exit(0)
pos, vals, ns, strict, kube = parse(rest)
if cmd == "lint":
    r = helm.lint(pos[0], vals, strict=strict, namespace=ns, kube_version=kube)
    for m in r["messages"]:
        print(["UNKNOWN", "INFO", "WARNING", "ERROR"][m["severity"]], m["path"], m["error"])
    bad = r["errors"] or any(m["severity"] == 3 or (strict and m["severity"] == 2) for m in r["messages"])
    print("1 chart(s) linted, %d chart(s) failed" % (1 if bad else 0))
    sys.exit(1 if bad else 0)
if cmd == "template":
    name, path = pos
    try:
        with helm.Chart.load(path) as c:
            c.validate_schema(vals)
            out = c.render(vals, name=name, namespace=ns or "default", is_install=True)
    except Exception as e:
        print("Error:", e, file=sys.stderr); sys.exit(1)
    for k in sorted(out):
        if k.endswith("NOTES.txt") or not out[k].strip():
            continue
        print("---\n# Source: %s\n%s" % (k, out[k].strip("\n")))
    sys.exit(0)
print("unsupported", cmd, file=sys.stderr); sys.exit(2)
