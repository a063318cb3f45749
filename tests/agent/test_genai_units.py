"""Pure parts of generative serving: package checks, stop strings, admission, request parsing,
the bytes of tokens that are part of a character."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import io
import json
import os
import pathlib
import tarfile
from collections.abc import Callable

import pytest

from edge_agent import diskspace, errors, openai_api, packages
from edgeplane_proto.headers import MAX_RETRY_AFTER_S
from edge_agent.admission import Admission, Retired
from edge_agent.runtime import genai, token_bytes
from edge_agent.runtime.genai import StopMatcher
from orchestrator.testing import genai_model


def _tar(path: pathlib.Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unpacked_package_is_on_the_disk_before_it_is_renamed_into_place(tmp_path: pathlib.Path) -> None:
    """After a power loss a version is whole or not there: every file and folder is synced
    before the rename that makes it the version's folder, and the rename after it."""
    sha = _tar(tmp_path / "p.tar", {"genai_config.json": b"{}", "sub/deeper/model.onnx": b"x", "tokenizer.json": b"{}"})
    synced: list[pathlib.Path] = []
    models = tmp_path / "models"

    def fsync(fd: int) -> None:
        synced.append(pathlib.Path(os.readlink(f"/proc/self/fd/{fd}")))
        os.fsync(fd)

    packages.unpack(tmp_path / "p.tar", sha, models, fsync=fsync)
    tmp = next(p for p in synced if p.parent == models)  # the temporary folder, renamed at the end
    named = ["<models>" if p == models else "<tmp>" if p == tmp else p.relative_to(tmp).as_posix() for p in synced]
    assert sorted(named[:3]) == ["genai_config.json", "sub/deeper/model.onnx", "tokenizer.json"]  # each as it is written
    assert named[3:] == [packages.MARK, "sub/deeper", "sub", "<tmp>", "<models>"]  # the mark, the folders deepest first; the rename last


def test_a_package_the_disk_has_no_room_for_is_refused_before_a_member_is_written(tmp_path: pathlib.Path) -> None:
    members = {"genai_config.json": b"{}", "model.onnx": b"x" * 4000, "tokenizer.json": b"{}" * 500}
    sha = _tar(tmp_path / "p.tar", members)
    unpacked = sum(len(data) for data in members.values())
    models = tmp_path / "models"
    reserve = 64 << 20

    def disk(spare: int) -> Callable[[pathlib.Path], diskspace.Room]:
        """A disk with ``spare`` bytes free beyond the reserve."""
        return lambda folder: diskspace.Room(os.stat(tmp_path).st_dev, free=reserve + spare, kept=reserve)

    with pytest.raises(OSError, match=rf"package {sha[:12]} unpacks to 0\.0 MB, and 67\.1 MB are free, 67\.1 MB of which are "
                                      "kept for the agent's own files") as failed:
        packages.unpack(tmp_path / "p.tar", sha, models, room=disk(unpacked - 1))
    assert failed.value.errno == errno.ENOSPC
    assert list(models.iterdir()) == []  # nothing half-unpacked, not even an empty folder
    folder = packages.unpack(tmp_path / "p.tar", sha, models, room=disk(unpacked))
    assert (folder / "model.onnx").read_bytes() == b"x" * 4000


def test_a_good_package_unpacks_once_into_its_digest_folder(tmp_path: pathlib.Path) -> None:
    sha = _tar(tmp_path / "p.tar", {"genai_config.json": b"{}", "sub/model.onnx": b"x"})
    folder = packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models")
    assert folder == tmp_path / "models" / sha and (folder / "sub" / "model.onnx").read_bytes() == b"x"
    assert packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models") == folder  # reused
    under_way = tmp_path / "models" / f".{'b' * 12}-x1y2"  # as unpack names its temporary folder
    under_way.mkdir()
    packages.prune(tmp_path / "models", keep={"b" * 64}, unpacking={"b" * 64})
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [under_way.name]  # v1 no longer wanted
    packages.prune(tmp_path / "models", keep=set(), unpacking=set())
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"genai_config.json": b"{}", "/abs/x": b"x"}, "absolute path"),
        ({"genai_config.json": b"{}", "a/../../x": b"x"}, "leaves the package folder"),
        ({"genai_config.json": b"{}", "a\\b": b"x"}, "invalid name"),
        ({"model.onnx": b"x"}, "no genai_config.json"),
        ({"genai_config.json": b"{}", packages.MARK: b""}, "the agent's own mark"),
        ({"genai_config.json": b"{}", "big": b"x" * 2000}, "more than 1000 bytes"),
    ],
)
def test_bad_packages_are_refused_and_leave_nothing(tmp_path: pathlib.Path, members: dict[str, bytes], words: str) -> None:
    sha = _tar(tmp_path / "p.tar", members)
    with pytest.raises(packages.PackageRefused, match=words.replace("(", r"\(")):
        packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models", max_bytes=1000)
    assert list((tmp_path / "models").iterdir()) == []


def _tar_of(path: pathlib.Path, *members: tuple[str, bytes | None]) -> str:
    """A tar of files (bytes) and folders (None), in this order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.size = len(data or b"")
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("members", "said"),
    [  # each was an OSError ("File exists", "File name too long"), reported as a disk fault and retried, or
       # a folder renamed into place that no load could use
        ((("genai_config.json", b"{}"), ("a", b"x"), ("a/b", b"y")), "package member 'a/b' is inside 'a', which is a file: refused"),
        ((("genai_config.json", b"{}"), ("a/b/c", b"y"), ("a", b"x")), "package member 'a/b/c' is inside 'a', which is a file: refused"),
        ((("genai_config.json", b"{}"), ("./", b"x")), "package member './' has an empty name"),
        ((("genai_config.json", b"{}"), ("/".join(["a"] * 1500) + "/x", b"y")),  # was a RecursionError out of the registry
         f"package member '{'a/' * 38}a'... is deeper than 64 folders or longer than 1024 characters: refused"),
        ((("genai_config.json", None),), "package's genai_config.json is a folder, not a file: not an onnxruntime-genai model"),
        ((("genai_config.json", b"{}"), ("d/" + "x" * 300, b"y")),
         f"package member 'd/{'x' * 75}'... has a name longer than this file system takes: refused"),
    ],
)
def test_packages_no_file_system_can_hold_are_refused_as_packages(tmp_path: pathlib.Path, members: tuple[tuple[str, bytes | None], ...],
                                                                   said: str) -> None:
    sha = _tar_of(tmp_path / "p.tar", *members)
    with pytest.raises(packages.PackageRefused) as refused:
        packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models")
    assert str(refused.value) == said
    assert list((tmp_path / "models").iterdir()) == []


def test_a_folder_tarred_from_inside_unpacks(tmp_path: pathlib.Path) -> None:
    """`tar -cf m.tar -C folder .` starts with the folder itself, "./"."""
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "genai_config.json").write_bytes(b"{}")
    (model / "sub" / "model.onnx").write_bytes(b"x" * 100)
    with tarfile.open(tmp_path / "p.tar", "w") as tar:
        tar.add(model, arcname=".")
    assert tarfile.open(tmp_path / "p.tar").getnames()[0] == "."
    folder = packages.unpack(tmp_path / "p.tar", hashlib.sha256((tmp_path / "p.tar").read_bytes()).hexdigest(), tmp_path / "models")
    assert (folder / "genai_config.json").read_bytes() == b"{}" and (folder / "sub" / "model.onnx").read_bytes() == b"x" * 100


def test_a_model_folder_damaged_on_disk_is_unpacked_again(tmp_path: pathlib.Path) -> None:
    sha = _tar(tmp_path / "p.tar", {"genai_config.json": b"{}", "model.onnx": b"x"})
    folder = packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models")
    (folder / "genai_config.json").unlink()  # was "Directory not empty" on every later try
    assert packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models") == folder
    assert (folder / "genai_config.json").read_bytes() == b"{}" and (folder / "model.onnx").read_bytes() == b"x"
    assert list((tmp_path / "models").iterdir()) == [folder]


def test_a_model_folder_an_agent_before_synced_unpacks_left_is_unpacked_again_once(tmp_path: pathlib.Path) -> None:
    """Agents before unpacks were synced renamed a folder whose files the page cache held: a
    power loss left it with its genai_config.json and an empty model.onnx, which was reused,
    and failed to load, at every start. Such a folder (no mark of a synced unpack) is unpacked
    again, once: the next start reuses it."""
    sha = _tar(tmp_path / "p.tar", {"genai_config.json": b"{}", "model.onnx": b"x" * 100})
    left = tmp_path / "models" / sha  # as such an agent left it after the power loss
    left.mkdir(parents=True)
    (left / "genai_config.json").write_bytes(b"{}")
    (left / "model.onnx").write_bytes(b"")
    folder = packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models")
    assert folder == left and (folder / "model.onnx").read_bytes() == b"x" * 100
    assert list((tmp_path / "models").iterdir()) == [folder]
    (tmp_path / "p.tar").unlink()  # reused as it is now: the package is not read again
    assert packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models") == folder


def test_a_mismatching_package_is_refused_before_it_is_read(tmp_path: pathlib.Path) -> None:
    _tar(tmp_path / "p.tar", {"genai_config.json": b"{}"})
    with pytest.raises(errors.ArtifactIntegrityError, match="is corrupt .*; removed"):
        packages.unpack(tmp_path / "p.tar", "0" * 64, tmp_path / "models")
    assert not (tmp_path / "p.tar").exists()  # from the cache: the next attempt fetches it again
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    junk_sha = hashlib.sha256((tmp_path / "junk.tar").read_bytes()).hexdigest()
    with pytest.raises(packages.PackageRefused, match="not a tar archive"):
        packages.unpack(tmp_path / "junk.tar", junk_sha, tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_too_many_members_are_refused(tmp_path: pathlib.Path) -> None:
    sha = _tar(tmp_path / "p.tar", {"genai_config.json": b"{}", **{f"f{i}": b"" for i in range(5)}})
    with pytest.raises(packages.PackageRefused, match="more than 3 members"):
        packages.unpack(tmp_path / "p.tar", sha, tmp_path / "models", max_files=3)


def test_stop_strings_cut_text_and_hold_back_possible_starts() -> None:
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("hello E") == ("hello ", False)  # "E" may start "END"
    assert m.feed("x") == ("Ex", False)  # it did not
    assert m.feed("ab\n") == ("ab", False)
    assert m.feed("\nmore") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("aEN") == ("a", False) and m.flush() == "EN"
    assert StopMatcher([]).feed("anything") == ("anything", False)
    m = StopMatcher(["END"])
    assert m.feed("aEN") == ("a", False) and m.feed("D") == ("", True) and m.flush() == ""


@pytest.mark.parametrize("stop", [("e!",), ("the end",)])
def test_text_held_back_for_a_stop_string_is_sent_when_the_model_ends_its_answer(tmp_path: pathlib.Path,
                                                                                  stop: tuple[str, ...]) -> None:
    from edge_agent.runtime import genai
    from orchestrator.testing import genai_model

    # With this bias the model answers " the" to "Where" and then ends on its end-of-sequence token.
    runtime = genai.GenAIModel.load(genai_model.build_model_dir(tmp_path, eos_bias=-1.0))

    def answer(stop: tuple[str, ...]) -> tuple[str, genai.Finished]:
        events: list[object] = []
        finished = runtime.generate(runtime.encode("Where"), genai.SamplingOptions(max_tokens=60, temperature=0, stop=stop),
                                    events.append, genai.Cancel())
        return "".join(e.text for e in events if isinstance(e, genai.TokenEvent)) + finished.text, finished

    plain, finished = answer(())
    assert finished.reason == "stop" and finished.completion_tokens < 60 and plain.endswith("e"), (plain, finished)
    # The stop string never occurs; its start, the answer's last characters, is held back until the end.
    text, finished = answer(stop)
    assert (text, finished.reason) == (plain, "stop")


async def test_admission_bounds_running_and_queued_and_hands_slots_on_in_order() -> None:
    gate = Admission(1, 1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert gate.queued == 1
    with pytest.raises(errors.Overloaded) as full:
        await gate.acquire()
    assert full.value.retry_after >= 1
    gate.release(0.5)
    await asyncio.wait_for(waiter, 1)
    assert (gate.active, gate.queued) == (1, 0)
    leaver = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    leaver.cancel()  # a waiter whose client left gives its place up
    with pytest.raises(asyncio.CancelledError):
        await leaver
    assert gate.queued == 0
    gate.release()
    assert gate.active == 0


async def test_the_wait_a_full_admission_asks_for_is_one_an_openai_client_honours() -> None:
    """Sequences held for minutes used to ask for a Retry-After of as many seconds (here
    1,442): the openai SDK ignores one over 60 s and retries after its own 0.5-8 s instead."""
    gate = Admission(1, 1)
    await gate.acquire()
    gate.release(3600.0)  # one long sequence: the moving average grows to 720 s
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    with pytest.raises(errors.Overloaded) as full:
        await gate.acquire()
    assert full.value.retry_after == MAX_RETRY_AFTER_S
    waiter.cancel()


@pytest.mark.parametrize("order", ["cancel, release, leaver runs", "release, cancel, leaver runs", "cancel, leaver runs, release"])
@pytest.mark.parametrize("behind", [0, 1])
async def test_a_waiter_that_leaves_passes_its_slot_on_whatever_the_order(order: str, behind: int) -> None:
    """A client that leaves while queued (its task cancelled) and the holder's release may
    come in any order before the leaver's task runs again: the leaver ends cancelled, and
    the slot goes to the waiter behind it or back to the pool, never lost nor doubled."""
    gate = Admission(1, 4)
    await gate.acquire()
    leaver = asyncio.create_task(gate.acquire())
    others = [asyncio.create_task(gate.acquire()) for _ in range(behind)]
    await asyncio.sleep(0)
    assert gate.queued == 1 + behind
    for step in order.split(", "):
        if step == "cancel":
            leaver.cancel()
        elif step == "release":
            gate.release()
        else:
            with pytest.raises(asyncio.CancelledError):
                await leaver
    await asyncio.wait_for(asyncio.gather(*others), 1)
    assert (gate.active, gate.queued) == (behind, 0)
    for _ in range(behind):
        gate.release()
    assert gate.active == 0
    await asyncio.wait_for(gate.acquire(), 1)  # the pool has its slot back
    assert (gate.active, gate.queued) == (1, 0)


async def test_a_closed_admission_refuses_its_waiters_and_tells_when_its_holders_are_done() -> None:
    drained: list[bool] = []
    gate = Admission(2, 4, lambda: drained.append(True))
    await gate.acquire()
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    gate.release()  # the slot passes to the first waiter, which has not run yet
    gate.close()
    granted, refused = await asyncio.gather(*waiters, return_exceptions=True)
    assert granted is None and isinstance(refused, Retired)  # the holder granted before the close keeps its slot
    with pytest.raises(Retired):
        await gate.acquire()
    gate.release()
    assert not drained  # one holder is left
    gate.release()
    assert drained == [True] and (gate.active, gate.queued) == (0, 0)


async def test_new_limits_let_waiters_in_at_once_or_hold_newcomers_until_holders_are_few_enough() -> None:
    gate = Admission(1, 4)
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    gate.resize(3, 4)  # raised: two waiters get the new slots at once
    await asyncio.wait_for(asyncio.gather(*waiters[:2]), 1)
    assert (gate.active, gate.queued) == (3, 1)
    gate.resize(1, 1)  # lowered: every holder keeps its slot
    assert (gate.active, gate.queued) == (3, 1)
    with pytest.raises(errors.Overloaded):  # one waits, as many as allowed now
        await gate.acquire()
    gate.release()
    gate.release()  # two slots given back without passing either on: 1 running, over none
    assert (gate.active, gate.queued) == (1, 1) and not waiters[2].done()
    gate.release()  # now the waiter may run
    await asyncio.wait_for(waiters[2], 1)
    assert (gate.active, gate.queued) == (1, 0)


CALL = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "assistant", "content": "", "tool_calls": CALL}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": CALL}], "messages[1].tool_calls"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": CALL}], "messages[1].tool_calls"),
    ([{"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}}], "messages[0].function_call"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "20C"}], "messages[1].tool_call_id"),
])
def test_a_tool_conversation_in_the_history_is_refused_naming_the_call(messages: list, param: str) -> None:
    with pytest.raises(openai_api.ApiError) as refused:
        openai_api.parse(json.dumps({"model": "m", "messages": messages}).encode(), chat=True)
    assert (refused.value.status, refused.value.param) == (400, param)
    empty = [{"role": "assistant", "content": "a", "tool_calls": [], "function_call": None}, {"role": "tool", "content": "b"}]
    assert len(openai_api.parse(json.dumps({"model": "m", "messages": empty}).encode(), chat=True).messages) == 2


@pytest.mark.parametrize(("metadata", "said"), [
    ({str(i): "v" for i in range(17)}, "at most 16 key-value pairs, got 17"),
    ({"k" * 65: "v"}, "keys are at most 64 characters long, got one of 65"),
    ({"k": "v" * 513}, "values are strings of at most 512 characters"),
    ({"k": 0}, "values are strings of at most 512 characters, got 0 for k"),
])
def test_metadata_past_openai_s_bounds_is_refused_naming_it(metadata: dict, said: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": metadata}
    with pytest.raises(openai_api.ApiError) as refused:
        openai_api.parse(json.dumps(body).encode(), chat=True)
    assert (refused.value.status, refused.value.param) == (400, "metadata") and said in refused.value.message
    within = {**body, "metadata": {str(i): "v" * 512 for i in range(16)} | {"k" * 64: ""}}
    within["metadata"].pop("0")
    assert openai_api.parse(json.dumps(within).encode(), chat=True).model == "m"


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \\"q\\" \xc3\xa9"}], "temperature": 0.5, "seed": 12345678901234567890}',
    '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16"),
    b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "m", "messages": [}',
    b'\xff\xfe{',
    b'[' * 100_000,
])
def test_a_body_read_on_a_worker_thread_is_read_as_any_other(raw: bytes) -> None:
    def outcome(**how: bool) -> object:
        try:
            return openai_api.parse(raw, chat=True, **how)
        except openai_api.ApiError as refused:
            return (refused.status, refused.param, refused.message.split(":")[0])

    assert outcome(interruptible=True) == outcome()


@pytest.mark.parametrize(("extra", "said"), [
    ({"metadata": {str(i): "" for i in range(openai_api.MAX_OBJECT_KEYS + 1)}}, "an object holds more than 1024 keys"),
    ({"metadata": {"k": [[{}] * 1000] * 300}}, "it holds more than 262144 values"),
    ({"stop": [""] * openai_api.MAX_BODY_VALUES}, "it holds more than 262144 values"),
])
def test_a_body_wider_than_any_route_takes_is_refused_while_it_is_read(extra: dict, said: str) -> None:
    """Read on a worker thread, a body is refused as soon as it is wider than any the routes
    take: building (and freeing) its millions of values holds the GIL, and so the event loop."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai_api.ApiError) as refused:
        openai_api.parse(json.dumps({**body, **extra}).encode(), chat=True, interruptible=True)
    assert refused.value.status == 400 and refused.value.message.endswith(said), refused.value.message
    # Just within the bounds it is read, and refused for what it holds.
    keys = {"metadata": {str(i): "" for i in range(openai_api.MAX_OBJECT_KEYS)}}
    with pytest.raises(openai_api.ApiError) as refused:
        openai_api.parse(json.dumps({**body, **keys}).encode(), chat=True, interruptible=True)
    assert refused.value.param == "metadata" and "at most 16 key-value pairs, got 1024" in refused.value.message


def test_request_parsing_defaults_and_names() -> None:
    r = openai_api.parse(json.dumps({"model": "m", "prompt": ["one"], "logprobs": 2}).encode(), chat=False)
    assert (r.prompt, r.max_tokens, r.options.logprobs, r.options.top_logprobs, r.options.temperature) == ("one", 16, True, 2, 1.0)
    r = openai_api.parse(json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                           {"type": "text", "text": "b"}]}],
                                     "max_completion_tokens": 3, "stop": "x"}).encode(), chat=True)
    assert (r.messages[0]["content"], r.max_tokens, r.options.stop) == ("ab", 3, ("x",))
    with pytest.raises(openai_api.ApiError) as err:
        openai_api.parse(b'{"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true}}', chat=True)
    assert err.value.param == "messages"
    with pytest.raises(openai_api.ApiError) as err:
        openai_api.parse(b'{"model": "m", "prompt": "p", "stream_options": {"include_usage": true}}', chat=False)
    assert err.value.param == "stream_options"


def test_the_byte_tokens_of_a_byte_level_vocabulary_are_the_bytes_they_stand_for(tmp_path: pathlib.Path) -> None:
    from tokenizers import Tokenizer

    folder = genai_model.build_model_dir(tmp_path / "tiny")
    partial = token_bytes.stream_tokens(json.loads((folder / "tokenizer.json").read_bytes()))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ("é", "€", "😊"):  # each character a token per byte in this vocabulary
        ids = tokenizer.encode(text).ids
        assert b"".join(partial[i] for i in ids) == text.encode(), text
    assert tokenizer.encode("The agent").ids[0] not in partial  # text on its own: not kept
    assert len(partial) == 129  # 0x80-0xFF: never UTF-8 alone; and NUL


def test_a_model_reads_the_bytes_of_its_tokens_when_it_loads_not_at_the_first_request_for_logprobs(
        tmp_path: pathlib.Path) -> None:
    folder = genai_model.build_model_dir(tmp_path / "tiny")
    model = genai.GenAIModel.load(folder)
    (folder / "tokenizer.json").unlink()  # tens of MB to parse, for a real model: not on a generation's way
    ids = [int(i) for i in model.encode("é")]
    assert [model.token_piece(i) for i in ids[-2:]] == [genai.Piece("bytes:\\xc3", b"\xc3"), genai.Piece("bytes:\\xa9", b"\xa9")]


def test_logprobs_show_special_tokens_and_nul_by_their_own_text(tmp_path: pathlib.Path) -> None:
    folder = genai_model.build_model_dir(tmp_path / "tiny")
    vocab = json.loads((folder / "tokenizer.json").read_bytes())["model"]["vocab"]
    model = genai.GenAIModel.load(folder)
    for special in genai_model.SPECIAL_TOKENS:  # the library decodes each to "" or U+FFFD
        assert model.token_piece(vocab[special]) == genai.Piece(special, special.encode())
    assert model.token_piece(vocab["\u0100"]) == genai.Piece("\x00", b"\x00")  # NUL, in a byte-level vocabulary
    assert model.token_piece(vocab["\u010a"]) == genai.Piece("\n", b"\n")  # other control characters are text


def test_a_token_of_a_vocabulary_whose_bytes_are_not_read_shows_unknown_bytes_though_it_lists_special_tokens(
        tmp_path: pathlib.Path) -> None:
    """Its tokenizer.json names no decoder: the library still decodes byte-level tokens (from
    its pre-tokenizer), which this agent does not read. A byte of "é" decodes to U+FFFD,
    whose own bytes are not that token's: they are unknown, whatever special tokens it lists."""
    folder = genai_model.build_model_dir(tmp_path / "tiny")
    tokenizer = json.loads((folder / "tokenizer.json").read_bytes())
    del tokenizer["decoder"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    model = genai.GenAIModel.load(folder)
    vocab = tokenizer["model"]["vocab"]
    assert model.token_piece(vocab["\u00c3"]) == genai.Piece("\ufffd", None)  # 0xC3
    special = genai_model.SPECIAL_TOKENS[0]
    assert model.token_piece(vocab[special]) == genai.Piece(special, special.encode())


def test_a_sentencepiece_vocabulary_s_special_and_nul_tokens_show_as_it_has_them() -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x00>": 3, "<0xE2>": 4, "<0x41>": 5, "\u2581the": 6}
    added = [{"id": 0, "content": "<unk>", "special": False}, {"id": 1, "content": "<s>", "special": True},
             {"id": 2, "content": "</s>", "special": True}]
    tokenizer = {"model": {"type": "BPE", "vocab": vocab}, "decoder": {"type": "ByteFallback"}, "added_tokens": added}
    assert token_bytes.shown_tokens(tokenizer) == {1: ("<s>", b"<s>"), 2: ("</s>", b"</s>"), 3: ("\x00", b"\x00"),
                                                   4: ("bytes:\\xe2", b"\xe2")}


@pytest.mark.parametrize("decoder", [{"type": "ByteFallback"},
                                     {"type": "Sequence", "decoders": [{"type": "Replace"}, {"type": "ByteFallback"}]}])
def test_the_byte_tokens_of_a_sentencepiece_vocabulary_are_the_bytes_they_name(decoder: dict) -> None:
    vocab = {"<unk>": 0, "<0x41>": 1, "<0xE2>": 2, "<0x82>": 3, "\u2581the": 4, "<0xe2>x": 5}
    assert token_bytes.stream_tokens({"model": {"type": "BPE", "vocab": vocab}, "decoder": decoder}) == {2: b"\xe2", 3: b"\x82"}


@pytest.mark.parametrize("tokenizer", [None, [], {"model": None}, {"model": {"vocab": {"<0xE2>": 1}}}])
def test_a_vocabulary_that_names_no_bytes_gives_none(tokenizer: object) -> None:
    assert token_bytes.stream_tokens(tokenizer) == {}


def test_a_character_split_over_tokens_shows_each_token_s_bytes_and_one_text_offset() -> None:
    e1, e2 = genai.Piece(token_bytes.display(b"\xc3"), b"\xc3"), genai.Piece(token_bytes.display(b"\xa9"), b"\xa9")
    x = genai.Piece("x", b"x")
    events = [genai.TokenEvent("", 1, e1, -1.0, ((e1, -1.0), (x, -2.0))), genai.TokenEvent("é", 2, e2, -0.5, ((e2, -0.5),)),
              genai.TokenEvent("x", 3, x, -0.25, ((x, -0.25),))]
    chat = openai_api.Shaper(openai_api.parse(b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "logprobs": true}',
                                              chat=True), "id", 0)
    content = chat.whole("éx", events, "length", 1, 3)["choices"][0]["logprobs"]["content"]
    assert [(c["token"], c["bytes"]) for c in content] == [("bytes:\\xc3", [0xC3]), ("bytes:\\xa9", [0xA9]), ("x", [0x78])]
    assert content[0]["top_logprobs"][0] == {"token": "bytes:\\xc3", "logprob": -1.0, "bytes": [0xC3]}
    # an echoed prompt ahead of the text (the route refuses echo with logprobs; the offsets still count from the text's start)
    parsed = openai_api.parse(b'{"model": "m", "prompt": "ab", "logprobs": 1}', chat=False)
    legacy = openai_api.Shaper(dataclasses.replace(parsed, echo=True), "id", 0)
    logprobs = legacy.whole("éx", events, "length", 1, 3)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["bytes:\\xc3", "bytes:\\xa9", "x"]
    assert logprobs["text_offset"] == [2, 3, 3]  # "x" is at 3 in "abéx"; the character's second byte adds none


def test_a_generative_model_loads_with_either_spinning_policy_and_generates_the_same(tmp_path: pathlib.Path) -> None:
    from edge_agent.runtime import genai
    from orchestrator.testing import genai_model

    genai_model.build_model_dir(tmp_path)
    texts = []
    for spin, spin_us, threads in ((False, 0, 0), (True, 0, 0), (False, 250, 0), (True, 0, 1)):
        runtime = genai.GenAIModel.load(tmp_path, genai.LoadOptions(spin_between_runs=spin, spin_after_run_us=spin_us,
                                                                    intra_op_threads=threads))
        events: list[object] = []
        runtime.generate(runtime.encode("The agent"), genai.SamplingOptions(max_tokens=8, temperature=0), events.append,
                         genai.Cancel())
        texts.append("".join(e.text for e in events if isinstance(e, genai.TokenEvent)))
    assert texts[0] and texts[0] == texts[1] == texts[2] == texts[3]


def test_a_prompt_read_in_chunks_gives_the_answer_and_logprobs_of_one_read(tmp_path: pathlib.Path) -> None:
    """The prompt is appended to the generator in chunks (so that a cancel is seen between
    two): the model's scores, and so a greedy answer, are those of the prompt read at once."""
    genai_model.build_model_dir(tmp_path)
    prompt_text = "the edge site serves tokens quickly and the gateway routes the request " * 6
    answers = []
    for chunk in (4096, 64, 7):
        runtime = genai.GenAIModel.load(tmp_path, genai.LoadOptions(prefill_chunk=chunk))
        prompt = runtime.encode(prompt_text)
        assert 150 < prompt.shape[0] < 200  # several chunks, within the context of 256
        events: list[object] = []
        finished = runtime.generate(prompt, genai.SamplingOptions(max_tokens=40, temperature=0, logprobs=True, top_logprobs=3),
                                    events.append, genai.Cancel())
        tokens = [e for e in events if isinstance(e, genai.TokenEvent)]
        assert finished.reason == "length" and len(tokens) == 40
        answers.append([(e.token_id, e.logprob, [(p.text, lp) for p, lp in e.top]) for e in tokens])
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize(("seed", "sampler"), [
    (0, 0), (5, 5), ((1 << 31) - 1, (1 << 31) - 1),  # the library's own range
    (-1, 1328900597), (-5, 2089307668),  # the library seeds at random from a negative one
    (1 << 31, 308764361), ((1 << 64) - 1, 1831381674), (-(1 << 63), 342188716),  # hashed: the same on every agent
])
def test_a_seed_is_the_sampler_s_own_in_its_range_and_hashed_into_it_beyond(seed: int, sampler: int) -> None:
    assert genai.runtime_seed(seed) == sampler


def test_seeds_the_sampler_cannot_take_as_they_are_stay_distinct() -> None:
    beyond = [5 + k * (1 << 31) for k in range(-8, 9) if k] + [-1, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1]
    mapped = [genai.runtime_seed(seed) for seed in beyond]
    assert all(0 <= m < 1 << 31 for m in mapped)
    assert len(set(mapped) | {5}) == len(beyond) + 1


class CancelledAfter(genai.Cancel):
    """A cancel that comes once the runtime has asked ``after`` times whether it came: a
    prefill asks before each chunk, so it comes with ``after`` chunks of the prompt read."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.asked = after, 0

    @property
    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > self.after


def test_a_cancel_while_a_long_prompt_is_read_stops_the_read_at_the_next_chunk(tmp_path: pathlib.Path) -> None:
    """A client that leaves while its prompt is read frees the model's slot (and the requests
    queued behind it) within a chunk: the rest of the prompt is never read, and no token made."""
    genai_model.build_model_dir(tmp_path)
    runtime = genai.GenAIModel.load(tmp_path, genai.LoadOptions(prefill_chunk=16))
    prompt = runtime.encode("the edge site serves tokens quickly and the gateway routes the request " * 6)
    chunks = -(-int(prompt.shape[0]) // 16)
    assert chunks >= 8
    events: list[object] = []
    cancel = CancelledAfter(2)
    finished = runtime.generate(prompt, genai.SamplingOptions(max_tokens=40, temperature=0), events.append, cancel)
    assert (finished.reason, finished.completion_tokens) == ("cancelled", 0) and events == [finished]
    assert cancel.asked == 3  # before the first, the second and the third chunk: two of them read, then it stopped
