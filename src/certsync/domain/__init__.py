"""Pure domain: certification states and transitions, renewal entries. Imports the standard library only."""

from certsync.domain.certification import (
    RENEWAL_ENTRY_SCHEMA_VERSION,
    TRANSITIONS,
    Certification,
    CertificationStatus,
    DomainError,
    InvalidRenewalEntry,
    InvalidTransition,
    Operation,
    Renewal,
    RenewalEntry,
    issue_status,
    transition,
)

__all__ = [
    "RENEWAL_ENTRY_SCHEMA_VERSION",
    "TRANSITIONS",
    "Certification",
    "CertificationStatus",
    "DomainError",
    "InvalidRenewalEntry",
    "InvalidTransition",
    "Operation",
    "Renewal",
    "RenewalEntry",
    "issue_status",
    "transition",
]
