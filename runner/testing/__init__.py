"""Test helpers shipped with the package: a scripted server with exact response timelines."""

from runner.testing.scripted import (
    DONE,
    STATE_KEY,
    End,
    Reply,
    ScriptedServer,
    ScriptedServerProcess,
    ServedRequest,
    ServerState,
    build_scripted_app,
    chat_chunk,
    completion_chunk,
    sse,
    token_timeline,
    usage_of,
)

__all__ = [
    "DONE",
    "STATE_KEY",
    "End",
    "Reply",
    "ScriptedServer",
    "ScriptedServerProcess",
    "ServedRequest",
    "ServerState",
    "build_scripted_app",
    "chat_chunk",
    "completion_chunk",
    "sse",
    "token_timeline",
    "usage_of",
]
