"""Masked secure aggregation: Bonawitz et al. (CCS 2017), with SecAgg+ (Bell et al. CCS 2020).

The server learns the sum of the clients' vectors and nothing else about any single one:
each client adds a self mask PRG(b_u) and pairwise masks +-PRG(s_uv) that cancel in the sum;
b_u and the mask key are Shamir-shared t-of-h so the server can remove the masks of clients that
drop out, and honest clients never reveal both kinds of share for one client. Threat model,
guarantees and what is NOT hidden: SECURITY.md.

Quick use (in-process simulation)::

    from secagg import SecAggParams, aggregate_in_process
    res = aggregate_in_process({0: x0, 1: x1, 2: x2}, clip=1.0, params=SecAggParams())
    res.sum, res.survivors, res.clipped

Deployment: `SecAggClient` and `SecAggServer` are state machines that exchange bytes only
(`secagg.messages`), so they run unchanged over any transport.

This package imports numpy, cryptography and the standard library only -- never torch,
privlora or accounting.
"""

from .client import SecAggClient
from .encoding import ClipReport, EncodingSpec
from .errors import (
    BadSignature,
    ConfigMismatch,
    ConfigurationError,
    DecryptionFailed,
    DuplicateKey,
    InconsistentSurvivors,
    InsecureThreshold,
    InvalidInput,
    InvalidPublicKey,
    MalformedMessage,
    MessageError,
    OverflowRisk,
    ProtocolAborted,
    ReconstructionFailed,
    ReplayedMessage,
    SecAggError,
    SurvivedAndDropped,
    TooFewClients,
    TooFewSurvivors,
    WrongRecipient,
    WrongNeighbours,
    WrongSender,
    WrongStage,
)
from .params import Plan, SecAggParams
from .server import SecAggServer, ServerResult
from .simulation import STAGES, SumResult, aggregate_in_process, generate_signing_keys, run_session

__all__ = [
    "SecAggParams",
    "Plan",
    "aggregate_in_process",
    "run_session",
    "generate_signing_keys",
    "SumResult",
    "STAGES",
    "SecAggClient",
    "SecAggServer",
    "ServerResult",
    "EncodingSpec",
    "ClipReport",
    "SecAggError",
    "ConfigurationError",
    "InsecureThreshold",
    "OverflowRisk",
    "InvalidInput",
    "ConfigMismatch",
    "MessageError",
    "MalformedMessage",
    "ReplayedMessage",
    "WrongStage",
    "WrongRecipient",
    "WrongSender",
    "WrongNeighbours",
    "InvalidPublicKey",
    "DecryptionFailed",
    "BadSignature",
    "DuplicateKey",
    "TooFewSurvivors",
    "TooFewClients",
    "InconsistentSurvivors",
    "SurvivedAndDropped",
    "ReconstructionFailed",
    "ProtocolAborted",
]
