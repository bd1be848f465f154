"""The generated gRPC code: up to date with the .proto files, carries the names DESIGN §6 fixes, and
speaks the same wire format as a client built from the .proto files alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from protos import exec_pb2, exec_pb2_grpc, prep_pb2, prep_pb2_grpc
from protos import generate as gen

PROTO_DIR = gen.PROTO_DIR


# ------------------------------------------------------------------- staleness


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    written = gen.generate(tmp_path)
    names = sorted(f.name for f in written)
    assert names == sorted(
        f"{stem}{suffix}" for stem in ("exec_pb2", "prep_pb2") for suffix in (".py", ".pyi", "_grpc.py")
    )
    committed = sorted(p.name for p in PROTO_DIR.glob("*_pb2*.py*"))
    assert committed == names, "protos/ holds generated files that no .proto produces (or misses some)"
    stale = [f.name for f in written if f.read_bytes() != (PROTO_DIR / f.name).read_bytes()]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_generated_for_the_pinned_runtime() -> None:
    import grpc
    from google.protobuf import __version__ as protobuf_version

    header = (PROTO_DIR / "prep_pb2.py").read_text()
    gen_version = next(
        line.split(":", 1)[1].strip() for line in header.splitlines() if "Protobuf Python Version" in line
    )
    assert tuple(map(int, gen_version.split("."))) <= tuple(map(int, protobuf_version.split(".")[:3]))
    assert gen_version.startswith("7."), gen_version  # pyproject pins protobuf>=7.35.1,<8
    assert f"GRPC_GENERATED_VERSION = '{grpc.__version__}'" in (PROTO_DIR / "prep_pb2_grpc.py").read_text()


# ------------------------------------------------------------- names (DESIGN §6)


def _method(service, name: str):
    m = service.methods_by_name.get(name)
    assert m is not None, f"{service.full_name} has no RPC {name}"
    return m


def _check_rpc(service, name: str, req: str, resp: str, server_streaming: bool = False) -> None:
    m = _method(service, name)
    assert m.input_type.name == req, (name, m.input_type.name)
    assert m.output_type.name == resp, (name, m.output_type.name)
    assert m.server_streaming is server_streaming, name
    assert m.client_streaming is False, name


def _fields(msg, *names: str, optional: tuple[str, ...] = (), repeated: tuple[str, ...] = ()) -> None:
    by_name = msg.fields_by_name
    missing = [n for n in (*names, *optional, *repeated) if n not in by_name]
    assert not missing, f"{msg.full_name} lacks {missing}"
    for n in optional:
        assert by_name[n].has_presence, f"{msg.full_name}.{n} must be `optional`"
    for n in repeated:
        assert by_name[n].is_repeated, f"{msg.full_name}.{n} must be repeated"


def test_exec_service_names() -> None:
    assert exec_pb2.DESCRIPTOR.package == "neuronserve.exec.v1"
    svc = exec_pb2.DESCRIPTOR.services_by_name["ExecService"]
    assert svc.full_name == "neuronserve.exec.v1.ExecService"
    _check_rpc(svc, "Generate", "GenerateRequest", "GenerateResponse", server_streaming=True)
    _check_rpc(svc, "Tokenize", "TokenizeRequest", "TokenizeResponse")
    _check_rpc(svc, "GetModelInfo", "GetModelInfoRequest", "ModelInfo")
    for attr in ("ExecServiceStub", "ExecServiceServicer", "add_ExecServiceServicer_to_server"):
        assert hasattr(exec_pb2_grpc, attr), attr

    req = exec_pb2.GenerateRequest.DESCRIPTOR
    _fields(req, "request_id", "prompt", "prompt_token_ids", "messages", "sampling", "stopping", "output")
    oneof = req.oneofs_by_name["input"]
    assert {f.name for f in oneof.fields} == {"prompt", "prompt_token_ids", "messages"}
    assert req.fields_by_name["prompt"].type == req.fields_by_name["prompt"].TYPE_STRING
    ids = req.fields_by_name["prompt_token_ids"].message_type.fields_by_name["ids"]
    assert ids.is_repeated and ids.type == ids.TYPE_UINT32

    sampling = req.fields_by_name["sampling"].message_type
    _fields(
        sampling,
        optional=(
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "seed",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ),
    )
    stopping = req.fields_by_name["stopping"].message_type
    _fields(
        stopping,
        "min_new_tokens",
        "ignore_eos",
        "include_stop_in_output",
        optional=("max_new_tokens", "time_limit_ms"),
        repeated=("stop", "stop_token_ids"),
    )
    output = req.fields_by_name["output"].message_type
    _fields(output, "logprobs", "top_logprobs", optional=("skip_special_tokens",))
    assert output.fields_by_name["logprobs"].type == output.fields_by_name["logprobs"].TYPE_BOOL
    assert output.fields_by_name["top_logprobs"].type == output.fields_by_name["top_logprobs"].TYPE_UINT32

    resp = exec_pb2.GenerateResponse.DESCRIPTOR
    _fields(
        resp,
        "request_id",
        "text",
        "finish_reason",
        "matched_stop",
        "usage",
        "timing",
        "seed",
        repeated=("token_ids", "logprobs"),
    )
    _fields(resp.fields_by_name["usage"].message_type, "prompt_tokens", "completion_tokens")
    _fields(resp.fields_by_name["timing"].message_type, "queue_ms", "ttft_ms", "total_ms")
    finish = resp.fields_by_name["finish_reason"].enum_type
    assert finish.name == "FinishReason"
    assert [v.name for v in finish.values] == [
        "FINISH_REASON_UNSPECIFIED",
        "LENGTH",
        "EOS",
        "STOP_SEQUENCE",
        "STOP_TOKEN",
        "CONTEXT_LENGTH",
        "TIME_LIMIT",
    ]
    assert finish.values_by_name["FINISH_REASON_UNSPECIFIED"].number == 0

    # ModelInfo: the design lists what it reports; these are the proto's names for them.
    _fields(
        exec_pb2.ModelInfo.DESCRIPTOR,
        "model",
        "revision",
        "family",
        "dtype",
        "tp_degree",
        "device",
        "max_batch_size",
        "max_seq_len",
        "vocab_size",
        "manifest_digest",
        "limits",
        "graphs",
        repeated=("context_buckets", "kv_buckets", "eos_token_ids"),
    )
    _fields(exec_pb2.GraphSetInfo.DESCRIPTOR, "key", "origin", "count")  # DESIGN §6: ModelInfo.graphs


def test_prep_service_names() -> None:
    assert prep_pb2.DESCRIPTOR.package == "neuronserve.prep.v1"
    svc = prep_pb2.DESCRIPTOR.services_by_name["PrepService"]
    assert svc.full_name == "neuronserve.prep.v1.PrepService"
    _check_rpc(svc, "PrepareModel", "PrepareModelRequest", "Operation")
    _check_rpc(svc, "GetOperation", "GetOperationRequest", "Operation")
    _check_rpc(svc, "WatchOperation", "WatchOperationRequest", "Operation", server_streaming=True)
    _check_rpc(svc, "CancelOperation", "CancelOperationRequest", "Operation")
    _check_rpc(svc, "ListOperations", "ListOperationsRequest", "ListOperationsResponse")
    _check_rpc(svc, "CompileGraphs", "CompileGraphsRequest", "Operation")  # DESIGN §6
    assert set(svc.methods_by_name) == {
        "PrepareModel",
        "CompileGraphs",
        "GetOperation",
        "WatchOperation",
        "CancelOperation",
        "ListOperations",
    }
    for attr in ("PrepServiceStub", "PrepServiceServicer", "add_PrepServiceServicer_to_server"):
        assert hasattr(prep_pb2_grpc, attr), attr

    _fields(
        prep_pb2.PrepareModelRequest.DESCRIPTOR,
        "source",
        "revision",
        "output",
        "tp_degree",
        "dtype",
        "force",
        optional=("gqa_strategy",),
    )
    op = prep_pb2.Operation.DESCRIPTOR
    _fields(op, "operation_id", "state", "progress", "manifest_uri", "error")
    states = op.fields_by_name["state"].enum_type
    assert {"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"} <= set(states.values_by_name)
    _fields(
        op.fields_by_name["progress"].message_type,
        "stage",
        "bytes_done",
        "bytes_total",
        "tensors_done",
        "tensors_total",
    )
    for name in ("GetOperationRequest", "WatchOperationRequest", "CancelOperationRequest"):
        _fields(prep_pb2.DESCRIPTOR.message_types_by_name[name], "operation_id")
    _fields(prep_pb2.ListOperationsResponse.DESCRIPTOR, repeated=("operations",))


# -------------------------------------------- a client built from the .proto files


@pytest.fixture(scope="module")
def proto_only_pool(tmp_path_factory) -> descriptor_pool.DescriptorPool:
    """A descriptor pool built by protoc from the .proto sources, sharing nothing with protos/*_pb2."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("fds") / "protos.fds"
    rc = protoc.main(
        [
            "protoc",
            f"-I{gen.ROOT}",
            f"--descriptor_set_out={out}",
            "--include_imports",
            *[str(PROTO_DIR / p) for p in gen.PROTOS],
        ]
    )
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    return pool


def _proto_only_class(pool, full_name: str):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def _without_json_names(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc's descriptor sets spell out the default json_name of every field; generated code doesn't."""

    def strip(messages) -> None:
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip(m.nested_type)

    strip(fd.message_type)
    return fd


def test_descriptors_match_proto_sources(proto_only_pool) -> None:
    for module in (prep_pb2, exec_pb2):
        committed = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(committed)
        fresh = descriptor_pb2.FileDescriptorProto()
        proto_only_pool.FindFileByName(module.DESCRIPTOR.name).CopyToProto(fresh)
        assert _without_json_names(committed) == _without_json_names(fresh), module.DESCRIPTOR.name


def _round_trip(pool, msg) -> None:
    """committed -> wire -> proto-only class -> wire -> committed, fields intact both ways."""
    other_cls = _proto_only_class(pool, msg.DESCRIPTOR.full_name)
    other = other_cls.FromString(msg.SerializeToString())
    opts = {"preserving_proto_field_name": True}
    assert json_format.MessageToDict(other, **opts) == json_format.MessageToDict(msg, **opts)
    back = type(msg).FromString(other.SerializeToString())
    assert back == msg


def test_proto_only_client_decodes_prep_messages(proto_only_pool) -> None:
    req = prep_pb2.PrepareModelRequest(
        source="HuggingFaceTB/SmolLM2-135M",
        revision="main",
        output="s3://bucket/prefix",
        tp_degree=4,
        dtype="bfloat16",
        gqa_strategy="replicate_to_tp_degree",
        force=True,
        allow_pickle=True,
        name="smollm2",
    )
    op = prep_pb2.Operation(
        operation_id="0123abcd",
        state=prep_pb2.Operation.FAILED,
        progress=prep_pb2.Progress(
            stage="convert", bytes_done=5 << 30, bytes_total=6 << 30, tensors_done=7, tensors_total=300
        ),
        manifest_uri="file:///tmp/store/models/m/k/manifest.json",
        error="model.safetensors: tensor 'lm_head.weight' has shape [1, 2]",
        artifact_key="k",
        reused=True,
        request=req,
        created_unix=1.5,
        updated_unix=2.25,
    )
    _round_trip(proto_only_pool, req)
    _round_trip(proto_only_pool, op)
    _round_trip(proto_only_pool, prep_pb2.ListOperationsResponse(operations=[op, op]))
    # An unset `optional` stays unset across the wire.
    other = _proto_only_class(proto_only_pool, "neuronserve.prep.v1.PrepareModelRequest").FromString(
        prep_pb2.PrepareModelRequest(source="x").SerializeToString()
    )
    assert not other.HasField("gqa_strategy")


def test_proto_only_client_decodes_exec_messages(proto_only_pool) -> None:
    req = exec_pb2.GenerateRequest(
        request_id="r1",
        prompt_token_ids=exec_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=exec_pb2.SamplingParams(temperature=0.0, top_k=5, seed=42),
        stopping=exec_pb2.StoppingCriteria(
            max_new_tokens=16, stop=["\n\n"], stop_token_ids=[2], ignore_eos=True
        ),
        output=exec_pb2.OutputOptions(logprobs=True, top_logprobs=3, skip_special_tokens=False),
    )
    _round_trip(proto_only_pool, req)
    other = _proto_only_class(proto_only_pool, "neuronserve.exec.v1.GenerateRequest").FromString(
        req.SerializeToString()
    )
    assert other.WhichOneof("input") == "prompt_token_ids"
    assert other.sampling.HasField("temperature") and not other.sampling.HasField("top_p")
    assert other.output.HasField("skip_special_tokens")

    chat = exec_pb2.GenerateRequest(
        messages=exec_pb2.ChatMessages(messages=[exec_pb2.ChatMessage(role="user", content="hé ✓")])
    )
    _round_trip(proto_only_pool, chat)

    resp = exec_pb2.GenerateResponse(
        request_id="r1",
        text="Hello",
        token_ids=[10, 11],
        logprobs=[
            exec_pb2.TokenLogprob(
                token_id=10, logprob=-0.5, top=[exec_pb2.TopLogprob(token_id=10, logprob=-0.5, token="Hel")]
            )
        ],
        finish_reason=exec_pb2.STOP_SEQUENCE,
        matched_stop="\n\n",
        usage=exec_pb2.Usage(prompt_tokens=3, completion_tokens=2),
        timing=exec_pb2.Timing(queue_ms=1.0, ttft_ms=2.5, total_ms=10.0),
        seed=42,
    )
    _round_trip(proto_only_pool, resp)
    info = exec_pb2.ModelInfo(
        model="m",
        tp_degree=2,
        context_buckets=[128, 512],
        eos_token_ids=[2],
        limits=exec_pb2.RequestLimits(max_prompt_tokens=4096),
    )
    _round_trip(proto_only_pool, info)
