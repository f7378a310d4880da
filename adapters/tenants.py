"""Tenants: who owns an expert, who may see it and who may change it.

An expert is shared (owner None: every key may use it) or private to one tenant (only that tenant's keys and
admin keys may see, name or be routed to it). A caller's `Scope` says what it sees; the router, the experts API,
/v1/models and the decision cache all ask the same `Scope`.

A private expert's name starts with its tenant's name and a dash (`acme-legal`). Tenant names hold no dash, so
the prefix names one tenant, and every name in a tenant's namespace is one that tenant may see: registering a
name can never answer "taken" about an expert the caller may not learn about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")


def check_tenant_name(tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise ValueError(f"tenant name {tenant!r} must be 1-32 characters of a-z, 0-9 or '_' (no '-'), starting "
                         "with a letter or digit")
    return tenant


def name_prefix(tenant: str) -> str:
    """What every name of `tenant`'s experts starts with."""
    return f"{tenant}-"


@dataclass(frozen=True)
class Scope:
    """What a caller may see: shared experts plus its tenant's own; `everything` (admin keys) sees all."""

    tenant: str | None = None
    everything: bool = False

    def sees(self, owner: str | None) -> bool:
        """May this caller see (list, name, be routed to) an expert owned by `owner` (None: shared)?"""
        return self.everything or owner is None or owner == self.tenant

    def manages(self, owner: str | None) -> bool:
        """May this caller register, replace or remove an expert owned by `owner`? Admin keys: any; a tenant's
        keys: that tenant's own; keys of no tenant: none."""
        return self.everything or (self.tenant is not None and owner == self.tenant)

    @property
    def key(self) -> str:
        """A name for the visible set: '*' (everything), '' (shared only) or the tenant."""
        return "*" if self.everything else (self.tenant or "")


EVERYTHING = Scope(everything=True)
SHARED = Scope()
