#!/usr/bin/env bash
# Regenerate the Python stubs for src/inhouse/protocols/proto/*.proto (KServe v2's
# grpc_service.proto, OpenClaw's openclaw_model_service.proto).
# Usage: bash scripts/gen_proto.sh          (needs: pip install grpcio-tools==1.81.1)
#
# The stubs register their messages in inhouse's own descriptor pool (proto/_pool.py), not
# protobuf's default one: tritonclient and KServe define the same `inference.*` messages, and
# two definitions of one symbol in the default pool make whichever is imported second fail.
set -euo pipefail
cd "$(dirname "$0")/../src"
PY=${PYTHON:-python}
for name in grpc_service openclaw_model_service; do
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    "inhouse/protocols/proto/$name.proto"
out="inhouse/protocols/proto/${name}_pb2.py"
"$PY" - "$out" <<'PYEOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
src, n = re.subn(r"_descriptor_pool\.Default\(\)", "_pool.POOL", src)
if n != 1:
    sys.exit(f"expected one default-pool registration in {path}, found {n}")
src = src.replace("from google.protobuf import symbol_database as _symbol_database\n",
                  "from google.protobuf import symbol_database as _symbol_database\n"
                  "from inhouse.protocols.proto import _pool\n", 1)
open(path, "w").write("# ruff: noqa\n" + src)
PYEOF
sed -i '1i # ruff: noqa' "inhouse/protocols/proto/${name}_pb2_grpc.py"
done
echo "generated: $(ls inhouse/protocols/proto/*_pb2*)"
