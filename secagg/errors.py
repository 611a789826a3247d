"""Every way secure aggregation can refuse to go on, each with its own name.

A failed check never returns a partial or wrong sum: it raises one of these. Catch `SecAggError`
to handle them all. The hierarchy:

    SecAggError
    ├── ConfigurationError (also ValueError)   refused before any message is sent
    │   ├── InsecureThreshold                  t <= (share holders)/2, or t larger than the holders
    │   ├── OverflowRisk                       n clients x quantized range does not fit Z_(2^b)
    │   ├── InvalidInput                       non-finite values, wrong length, bad clip range
    │   └── ConfigMismatch                     the server's session parameters differ from ours
    ├── MessageError                           a message that must not be processed
    │   ├── MalformedMessage                   truncated, oversized, bad magic/version/lengths
    │   ├── ReplayedMessage                    from another round or session, or a duplicate
    │   ├── WrongStage                         a valid kind, but not the one this stage expects
    │   ├── WrongRecipient                     addressed to someone else
    │   ├── WrongSender                        claims a sender other than the one it came from,
    │   │                                      or a sender that is not a client id
    │   ├── WrongNeighbours                    a key list whose keys in full are not exactly the
    │   │                                      recipient's holders in the graph the list determines
    │   └── InvalidPublicKey                   an X25519 key of low order (an all-zero secret)
    ├── DecryptionFailed                       AEAD tag check failed (tampering or wrong binding)
    ├── BadSignature                           a signed message (key advertisement, shares, masked
    │                                          input, unmasking shares) does not verify
    ├── DuplicateKey                           the same public key advertised twice
    ├── TooFewSurvivors                        fewer than t survivors: abort before unmasking
    │   └── TooFewClients                      a key list or survivor list shorter than
    │                                          `Plan.min_clients` (what a malicious server would send)
    ├── InconsistentSurvivors                  survivor views differ between clients
    │   └── SurvivedAndDropped                 one client listed as both survived and dropped
    ├── ReconstructionFailed                   Shamir shares do not reconstruct a valid secret
    └── ProtocolAborted                        this party already aborted; it will not go on
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by `secagg`."""


class ConfigurationError(SecAggError, ValueError):
    """The protocol parameters are unusable; nothing has been sent."""


class InsecureThreshold(ConfigurationError):
    """The Shamir threshold t is not above half of the share holders (or exceeds them)."""


class OverflowRisk(ConfigurationError):
    """The sum of n clients' quantized values could wrap around the modulus 2^b."""


class InvalidInput(ConfigurationError):
    """An input vector or clip range is unusable (non-finite, wrong length, non-positive range)."""


class ConfigMismatch(ConfigurationError):
    """The session parameters announced by the server differ from this party's own."""


class MessageError(SecAggError):
    """A message was refused before any of its content was acted on."""


class MalformedMessage(MessageError):
    """Truncated, oversized, trailing bytes, bad magic, unknown version or kind, bad lengths."""


class ReplayedMessage(MessageError):
    """A message from another round or session, or a second copy of one already received."""


class WrongStage(MessageError):
    """A well-formed message of a kind this party does not expect at its current stage."""


class WrongRecipient(MessageError):
    """A message addressed to another party."""


class WrongSender(MessageError):
    """A message whose claimed sender is not the party it arrived from, or not allowed here."""


class WrongNeighbours(MessageError):
    """A key list that carries in full the keys of a client that is not one of the recipient's
    neighbours in the graph the list itself determines, or lacks a neighbour's keys: what a
    server choosing (or hiding) the recipient's neighbours would send."""


class InvalidPublicKey(MalformedMessage):
    """An X25519 public key of small order: every key agreement with it gives the all-zero secret."""


class DecryptionFailed(SecAggError):
    """An encrypted share failed authentication: tampered, or bound to another context."""


class BadSignature(SecAggError):
    """A signature does not verify under the pinned (or advertised) Ed25519 key."""


class DuplicateKey(SecAggError):
    """The same public key appears more than once in a key advertisement or key list."""


class TooFewSurvivors(SecAggError):
    """Fewer than t parties remain; the protocol aborts before any unmasking share is released."""


class TooFewClients(TooFewSurvivors):
    """A key list or survivor list has fewer clients than the parameters allow (`Plan.min_clients`).

    An honest server never sends one (it aborts first); a malicious server would, to shrink the
    set an honest client's shares and masks are spread over."""


class InconsistentSurvivors(SecAggError):
    """The server's survivor lists are not consistent (between clients or with what we saw)."""


class SurvivedAndDropped(InconsistentSurvivors):
    """The server listed a client both as survived and as dropped; answering would unmask it."""


class ReconstructionFailed(SecAggError):
    """Shamir shares did not reconstruct a valid secret (a corrupted or forged share)."""


class ProtocolAborted(SecAggError):
    """This party aborted earlier in the session and refuses to continue."""


__all__ = [
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
