"""MindSpore Lite worker, run by the Python 3.7 interpreter that has mindspore-lite 2.0.0 (the only Lite on the
package registry). Keep this file Python 3.7 compatible and free of project imports.

Protocol on stdin/stdout, one request at a time: a JSON header line, then `n_arrays` length-prefixed `.npy` arrays;
the reply is a JSON header line (`ok`, `error`, `n_arrays`) followed by its arrays.
  {"op": "convert", "onnx": PATH, "output": PATH_WITHOUT_SUFFIX}  -> writes PATH.mindir (ONNX -> Lite MindIR)
  {"op": "load", "name": NAME, "path": PATH.mindir}                -> builds a CPU model with thread_num 1
  {"op": "run", "name": NAME, "n_arrays": N} + N arrays            -> the model's outputs, copied
  {"op": "exit"}
"""

import io
import json
import os
import sys

import numpy as np


def read_array(stream) -> np.ndarray:  # noqa: ANN001
    """An 8-byte little-endian length, then that many bytes of `.npy` (pipes cannot seek: no np.load on them)."""
    size = int.from_bytes(stream.read(8), "little")
    return np.load(io.BytesIO(stream.read(size)), allow_pickle=False)


def write_array(stream, array) -> None:  # noqa: ANN001
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    stream.write(len(buf.getvalue()).to_bytes(8, "little"))
    stream.write(buf.getvalue())


def _reply(out, header, arrays=()):
    header = dict(header, n_arrays=len(arrays))
    out.write((json.dumps(header) + "\n").encode("utf-8"))
    for a in arrays:
        write_array(out, a)
    out.flush()


def main() -> None:
    # the protocol gets a private copy of stdout; fd 1 itself goes to stderr, so the C++ library's own prints
    # cannot corrupt replies
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    import mindspore_lite as mslite

    models = {}
    while True:
        line = inp.readline()
        if not line:
            return
        req = json.loads(line.decode("utf-8"))
        arrays = [read_array(inp) for _ in range(req.get("n_arrays", 0))]
        try:
            if req["op"] == "exit":
                _reply(out, {"ok": True})
                return
            if req["op"] == "convert":
                conv = mslite.Converter()
                conv.save_type = mslite.ModelType.MINDIR
                conv.optimize = "general"
                conv.convert(mslite.FmkType.ONNX, req["onnx"], req["output"])
                _reply(out, {"ok": True})
            elif req["op"] == "load":
                ctx = mslite.Context()
                ctx.target = ["cpu"]
                ctx.cpu.thread_num = 1  # Lite 2.0's LayerNorm is wrong with more than one thread
                model = mslite.Model()
                model.build_from_file(req["path"], mslite.ModelType.MINDIR, ctx)
                models[req["name"]] = model
                _reply(out, {"ok": True, "inputs": [t.name for t in model.get_inputs()]})
            elif req["op"] == "run":
                model = models[req["name"]]
                tensors = model.get_inputs()
                for t, a in zip(tensors, arrays):
                    t.set_data_from_numpy(a)
                outputs = model.predict(tensors)
                # copies: Lite reuses output memory on the next predict
                _reply(out, {"ok": True}, [np.array(o.get_data_to_numpy(), copy=True) for o in outputs])
            else:
                _reply(out, {"ok": False, "error": "unknown op %r" % req["op"]})
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises with context
            _reply(out, {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)})


if __name__ == "__main__":
    main()
