"""Presentation contexts that are cheap to copy for each association the gateway accepts.

pynetdicom deep-copies the acceptor's supported contexts for every association. The gateway accepts every
storage SOP class in every transfer syntax (171 contexts, about 7,700 transfer syntax UIDs), and a deep copy
re-creates and re-validates each UID: about 70 ms of the receiving process's CPU per association, paid again
for every study a modality sends on an association of its own. A context here copies its list of transfer
syntaxes and shares the UIDs in it (immutable strings), which is all an association's copy needs.

Example:
    >>> import copy
    >>> from pynetdicom import AE
    >>> ae = AE()
    >>> ae.add_supported_context("1.2.840.10008.1.1")
    >>> contexts = shared_syntax_contexts(ae.supported_contexts)
    >>> copy.deepcopy(contexts)[0].transfer_syntax == contexts[0].transfer_syntax
    True
"""

from __future__ import annotations

from pynetdicom.presentation import PresentationContext


class SharedSyntaxContext(PresentationContext):
    """A presentation context whose copies share its UIDs; a copy gets its own list of transfer syntaxes."""

    def __deepcopy__(self, memo: dict) -> SharedSyntaxContext:
        return _shared(self)


def shared_syntax_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """`contexts` (an AE's supported contexts) as `SharedSyntaxContext`s with the same attributes."""
    return [_shared(cx) for cx in contexts]


def _shared(cx: PresentationContext) -> SharedSyntaxContext:
    """A `SharedSyntaxContext` with `cx`'s attributes and a list of transfer syntaxes of its own."""
    new = SharedSyntaxContext.__new__(SharedSyntaxContext)
    new.__dict__.update(cx.__dict__)
    new._transfer_syntax = list(cx._transfer_syntax)
    return new
