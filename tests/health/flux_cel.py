"""Evaluates Flux healthCheckExprs (CEL) against one object, the way Flux binds them: each
top-level field of the object (apiVersion, kind, metadata, spec, status) is a variable.

stdin: {"exprs": {"inProgress": "...", "failed": "...", "current": "..."}, "object": {...}}
stdout: {"inProgress": true, ...}
The evaluator is the pure-Python cel-python package, pinned in hack/setup.sh.
"""

import json
import sys

import celpy


def main() -> None:
    req = json.load(sys.stdin)
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in req["object"].items()}
    out = {}
    for name, expr in req["exprs"].items():
        result = env.program(env.compile(expr)).evaluate(activation)
        if not isinstance(result, celpy.celtypes.BoolType):
            sys.exit(f"{name}: not a bool: {result!r}")
        out[name] = bool(result)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
