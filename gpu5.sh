mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD:$PWD/proto
python3 -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/polyglot/v1/lm.proto
export POLYGLOT_GPU_REPORT=$OUT/gpu-suite.json
( time make test-gpu GPU_PY=python3 ) > $OUT/test-gpu.log 2>&1
tail -4 $OUT/test-gpu.log; grep -E "^E |FAIL|Error" $OUT/test-gpu.log | head -20
