"""Supabase's database linter (splinter, the Security and Performance Advisors) on the migrated schema.

Two parts:

- ``test_splinter_finds_no_warn_or_error``: splinter's own lint queries, run one by one against a freshly
  migrated database. They are not vendored: supabase/splinter carries no licence (its README's badge is not
  a licence; supabase/splinter#137 asks for one), so nobody may redistribute them. Point
  ``CERTSYNC_SPLINTER_DIR`` at a checkout of it (the folder holding ``lints/``) to run them; without it the
  test is skipped and says so. Checked against commit 55db5b1f28e58d816f7d9136eed87eabcd95868d.
- ``test_splinters_rule_holds``: certsync's own catalogue queries for the same rules, written from
  splinter's documentation (docs/00NN_*.md there), one per lint and named by its number, so CI checks them
  whether or not a copy of splinter is at hand. Lints that need what only a Supabase project has are
  listed in ``NOT_HERE`` with the reason, and skipped by name.

Splinter reads the schemas PostgREST exposes from the ``pgrst.db_schemas`` setting, which a plain
PostgreSQL does not have: unset, those lints look at no schema and find nothing. Both parts set it to
Supabase's default (docs/security.md, "Supabase's linter").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.rls import EXPOSED_SCHEMAS, rows

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]

SPLINTER_DIR = os.environ.get("CERTSYNC_SPLINTER_DIR")

# Splinter's lints that need a part of Supabase a plain PostgreSQL with certsync's shims lacks: when the
# part is missing they run but can find nothing, so they are skipped with the reason rather than passed.
NEEDS = {
    "0019_insecure_queue_exposed_in_api": (
        "select exists (select 1 from pg_namespace where nspname = 'pgmq')",
        "needs Supabase Queues (the pgmq schema); certsync uses its own outbox, not pgmq",
    ),
    "0025_public_bucket_allows_listing": (
        "select to_regclass('storage.buckets') is not null",
        "needs Supabase Storage (storage.buckets); certsync stores no files",
    ),
    "0026_pg_graphql_anon_table_exposed": (
        "select exists (select 1 from pg_extension where extname = 'pg_graphql')",
        "needs the pg_graphql extension (off by default on new Supabase projects)",
    ),
    "0027_pg_graphql_authenticated_table_exposed": (
        "select exists (select 1 from pg_extension where extname = 'pg_graphql')",
        "needs the pg_graphql extension; where it is on, this lint lists the five tables authenticated"
        " reads by design (organisations … certifications): see docs/security.md",
    ),
}

# INFO findings that say nothing on a database that was migrated a moment ago, or that are by design.
EXPECTED_INFO = {
    "unused_index": "no query has run yet on a fresh database",
    "table_bloat": "a fresh database has no bloat to speak of",
    "rls_enabled_no_policy": "the service-only tables (outbox, retry queue, breaker): RLS on, no policy,"
    " so no API role sees a row even if granted",
}


def splinter_lints() -> list[Any]:
    if not SPLINTER_DIR:
        return [
            pytest.param(
                None,
                marks=pytest.mark.skip(
                    reason="CERTSYNC_SPLINTER_DIR is not set: splinter is not vendored (it has no licence);"
                    " point it at a checkout of supabase/splinter to run its lints"
                ),
                id="splinter-not-available",
            )
        ]
    return [pytest.param(path, id=path.stem) for path in sorted((Path(SPLINTER_DIR) / "lints").glob("*.sql"))]


def run_lint(conn: Conn, sql: str, view: str) -> list[tuple[str, str, str]]:
    """One lint file (``create view lint."…" as …``), run and rolled back as Supabase's advisors run it."""
    with conn.transaction(force_rollback=True):
        conn.execute("create schema lint")
        conn.execute(f"set local pgrst.db_schemas = '{', '.join(EXPOSED_SCHEMAS)}'")
        conn.execute("set local search_path = ''")
        conn.execute(sql.encode())
        return [(r[0], r[1], r[2]) for r in conn.execute(f'select name, level, detail from lint."{view}"')]


@pytest.mark.parametrize("lint", splinter_lints())
def test_splinter_finds_no_warn_or_error(superuser: Conn, lint: Path) -> None:
    if lint.stem in NEEDS:
        present, reason = NEEDS[lint.stem]
        if not rows(superuser, present)[0][0]:
            pytest.skip(f"{lint.stem}: {reason}")
    findings = run_lint(superuser, lint.read_text(encoding="utf-8"), lint.stem)
    for name, level, detail in findings:
        print(f"{level} {name}: {detail}")
    unexpected = [
        (name, level, detail)
        for name, level, detail in findings
        if level in ("WARN", "ERROR") or (level == "INFO" and name not in EXPECTED_INFO)
    ]
    assert unexpected == [], "\n".join(f"{level} {name}: {detail}" for name, level, detail in unexpected)


# --- certsync's own reading of splinter's rules -----------------------------------------------------------

# Schemas certsync's migrations own objects in: everything but PostgreSQL's, Supabase's (auth, and the
# shims standing in for it) and the migration bookkeeping.
OURS = "n.nspname !~ '^pg_' and n.nspname not in ('information_schema', 'auth', 'supabase_migrations')"
EXPOSED = "n.nspname = any(%(exposed)s)"
# The calls Supabase's advice wraps in (select …) so that each runs once per statement, not per row.
CALL = "auth\\.(uid|jwt|role|email)\\(\\)|current_setting\\("
API_ROLE_MAY_SELECT = (
    "(has_table_privilege('anon', c.oid, 'SELECT') or has_table_privilege('authenticated', c.oid, 'SELECT'))"
)
NOT_OF_AN_EXTENSION = "not exists (select 1 from pg_depend e where e.objid = {oid} and e.deptype = 'e')"

RULES: dict[str, tuple[str, str]] = {
    "0001_unindexed_foreign_keys": (
        "INFO, and fixed all the same: every foreign key's columns lead some valid index",
        f"""select format('%%I.%%I %%s', n.nspname, c.relname, con.conname)
        from pg_constraint con
        join pg_class c on c.oid = con.conrelid join pg_namespace n on n.oid = c.relnamespace
        where con.contype = 'f' and {OURS}
          and not exists (
            select 1 from pg_index i
            where i.indrelid = con.conrelid and i.indisvalid
              and (select array_agg(k order by k) from unnest(
                     (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(con.conkey)]) k)
                = (select array_agg(k order by k) from unnest(con.conkey) k))""",
    ),
    "0002_auth_users_exposed": (
        "ERROR: no view or materialized view the API roles may read depends on auth.users",
        f"""select distinct format('%%I.%%I', n.nspname, c.relname)
        from pg_depend d join pg_rewrite r on r.oid = d.objid join pg_class c on c.oid = r.ev_class
        join pg_namespace n on n.oid = c.relnamespace
        where d.classid = 'pg_rewrite'::regclass and d.refobjid = 'auth.users'::regclass
          and c.oid <> d.refobjid and {EXPOSED} and {API_ROLE_MAY_SELECT}""",
    ),
    "0003_auth_rls_initplan": (
        "WARN: every auth.<function>() and current_setting() in a policy runs once per statement (select …)",
        f"""select format('%%I.%%I %%s', n.nspname, c.relname, p.polname)
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        cross join lateral (values (pg_get_expr(p.polqual, p.polrelid)),
                                   (pg_get_expr(p.polwithcheck, p.polrelid))) as e(expr)
        where {OURS} and e.expr is not null
          and regexp_count(e.expr, '{CALL}', 1, 'i') > regexp_count(e.expr, 'select ({CALL})', 1, 'i')""",
    ),
    "0004_no_primary_key": (
        "INFO: every table has a primary key",
        f"""select format('%%I.%%I', n.nspname, c.relname)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'p') and {OURS}
          and not exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary)""",
    ),
    "0006_multiple_permissive_policies": (
        "WARN: at most one permissive policy per table, API role and command",
        f"""select format('%%I.%%I %%s %%s: %%s', n.nspname, c.relname, role, cmd,
                          string_agg(p.polname, ', ' order by p.polname))
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        cross join unnest(case when p.polroles = '{{0}}' then array['anon', 'authenticated']::name[]
                               else array(select rolname from pg_roles where oid = any(p.polroles)) end)
          as role
        cross join unnest(case p.polcmd when 'r' then array['SELECT'] when 'a' then array['INSERT']
                                        when 'w' then array['UPDATE'] when 'd' then array['DELETE']
                                        else array['SELECT', 'INSERT', 'UPDATE', 'DELETE'] end) as cmd
        where p.polpermissive and {OURS}
        group by n.nspname, c.relname, role, cmd having count(*) > 1""",
    ),
    "0007_policy_exists_rls_disabled": (
        "ERROR: no table has policies while its RLS is off",
        f"""select distinct format('%%I.%%I', n.nspname, c.relname)
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        where not c.relrowsecurity and {OURS}""",
    ),
    "0009_duplicate_index": (
        "WARN: no two indexes of a table are the same index",
        f"""select format('%%I.%%I: %%s', n.nspname, c.relname,
                          string_agg(i.indexrelid::regclass::text, ', '))
        from pg_index i join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
        where {OURS}
        group by n.nspname, c.relname, i.indkey::text, i.indclass::text,
                 pg_get_expr(i.indexprs, i.indrelid), pg_get_expr(i.indpred, i.indrelid)
        having count(*) > 1""",
    ),
    "0010_security_definer_view": (
        "ERROR: every view the API serves runs with its caller's privileges (security_invoker)",
        f"""select format('%%I.%%I', n.nspname, c.relname)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'v' and {EXPOSED}
          and not coalesce(lower(c.reloptions::text)::text[]
                           && array['security_invoker=1', 'security_invoker=true', 'security_invoker=on',
                                    'security_invoker=yes'], false)""",
    ),
    "0011_function_search_path_mutable": (
        "WARN: every function pins its search_path",
        f"""select format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where {OURS} and {NOT_OF_AN_EXTENSION.format(oid="p.oid")}
          and not exists (select 1 from unnest(p.proconfig) s where s like 'search_path=%%')""",
    ),
    "0013_rls_disabled_in_public": (
        "ERROR: every table the API serves has RLS on",
        f"""select format('%%I.%%I', n.nspname, c.relname)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'p') and {EXPOSED} and not c.relrowsecurity""",
    ),
    "0014_extension_in_public": (
        "WARN: no extension lives in public",
        "select extname from pg_extension e join pg_namespace n on n.oid = e.extnamespace"
        " where n.nspname = 'public'",
    ),
    "0015_rls_references_user_metadata": (
        "ERROR: no policy reads user_metadata, which users edit themselves",
        f"""select format('%%I.%%I %%s', n.nspname, c.relname, p.polname)
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        where {OURS} and concat(pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
                         ilike '%%user_metadata%%'""",
    ),
    "0016_materialized_view_in_api": (
        "WARN: no materialized view the API roles may read is served (it bypasses RLS)",
        f"""select format('%%I.%%I', n.nspname, c.relname)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'm' and {EXPOSED} and {API_ROLE_MAY_SELECT}""",
    ),
    "0017_foreign_table_in_api": (
        "WARN: no foreign table the API roles may read is served (it bypasses RLS)",
        f"""select format('%%I.%%I', n.nspname, c.relname)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'f' and {EXPOSED} and {API_ROLE_MAY_SELECT}""",
    ),
    "0018_unsupported_reg_types": (
        "WARN: no column has a reg* type pg_upgrade cannot carry (all but regclass, regrole, regtype)",
        f"""select format('%%I.%%I.%%I %%s', n.nspname, c.relname, a.attname, t.typname)
        from pg_attribute a
        join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
        join pg_type t on t.oid = a.atttypid
        where {OURS} and a.attnum > 0 and not a.attisdropped
          and t.typname in ('regcollation', 'regconfig', 'regdictionary', 'regnamespace', 'regoper',
                            'regoperator', 'regproc', 'regprocedure')""",
    ),
    "0021_fkey_to_auth_unique": (
        "ERROR: a foreign key to auth.users references its primary key, not another unique column",
        f"""select format('%%I.%%I %%s', n.nspname, c.relname, con.conname)
        from pg_constraint con
        join pg_class c on c.oid = con.conrelid join pg_namespace n on n.oid = c.relnamespace
        where con.contype = 'f' and con.confrelid = 'auth.users'::regclass and {OURS}
          and con.confkey <> (select pk.conkey from pg_constraint pk
                              where pk.conrelid = 'auth.users'::regclass and pk.contype = 'p')""",
    ),
    "0022_extension_versions_outdated": (
        "WARN: every extension is at its default version",
        "select format('%%s %%s (default %%s)', e.extname, e.extversion, a.default_version)"
        " from pg_extension e join pg_available_extensions a on a.name = e.extname"
        " where a.default_version is not null and e.extversion <> a.default_version",
    ),
    "0024_rls_policy_always_true": (
        "WARN: no permissive policy for the API roles lets every row through a write",
        f"""select format('%%I.%%I %%s', n.nspname, c.relname, p.polname)
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        cross join lateral (select lower(regexp_replace(coalesce(pg_get_expr(p.polqual, p.polrelid), ''),
                                                        '[\\s()]', '', 'g')) as q,
                                   lower(regexp_replace(coalesce(pg_get_expr(p.polwithcheck, p.polrelid), ''),
                                                        '[\\s()]', '', 'g')) as w) e
        where p.polpermissive and {OURS}
          and (p.polroles = '{{0}}' or exists (select 1 from pg_roles r where r.oid = any(p.polroles)
                                                and r.rolname in ('anon', 'authenticated')))
          and ((p.polcmd in ('w', 'd', '*') and e.q in ('', 'true', '1=1'))
               or e.w in ('true', '1=1')
               or (p.polcmd = 'a' and e.w = ''))""",
    ),
    "0028_anon_security_definer_function_executable": (
        "WARN: anon may execute no security definer function the API serves",
        f"""select format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where p.prosecdef and {EXPOSED} and has_function_privilege('anon', p.oid, 'EXECUTE')""",
    ),
    "0029_authenticated_security_definer_function_executable": (
        "WARN: authenticated may execute no security definer function the API serves"
        " (for every schema, see test_privileges.py)",
        f"""select format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where p.prosecdef and {EXPOSED} and has_function_privilege('authenticated', p.oid, 'EXECUTE')""",
    ),
}

# Splinter's lints without a rule above, and why.
NOT_HERE = {
    "0005_unused_index": "INFO, and says nothing on a freshly migrated database (no query has run)",
    "0008_rls_enabled_no_policy": "INFO, and by design: the service-only tables have RLS on and no policy",
    "0012_auth_allow_anonymous_sign_ins": "a setting of Supabase Auth, not of the database (no query)",
    "0019_insecure_queue_exposed_in_api": "needs Supabase Queues (pgmq), which certsync does not use",
    "0020_table_bloat": "INFO, and says nothing on a freshly migrated database (no dead rows yet)",
    "0023_sensitive_columns_exposed": "flags only exposed tables without RLS, which 0013 already forbids",
    "0025_public_bucket_allows_listing": "needs Supabase Storage (storage.buckets); certsync stores no files",
    "0026_pg_graphql_anon_table_exposed": "needs pg_graphql; anon may read no table (test_rls_lint.py)",
    "0027_pg_graphql_authenticated_table_exposed": "needs pg_graphql; lists by design the tables"
    " authenticated reads (docs/security.md)",
}


@pytest.mark.parametrize("lint", sorted(RULES))
def test_splinters_rule_holds(superuser: Conn, lint: str) -> None:
    rule, query = RULES[lint]
    assert rows(superuser, query, {"exposed": EXPOSED_SCHEMAS}) == [], f"splinter {lint}: {rule}"


@pytest.mark.parametrize("lint", sorted(NOT_HERE))
def test_splinters_lint_that_cannot_run_here_says_why(lint: str) -> None:
    pytest.skip(f"splinter {lint}: {NOT_HERE[lint]}")


def test_every_lint_of_splinter_is_either_checked_or_skipped_with_a_reason() -> None:
    # Its lints, by number, at the commit named above (0012 is a setting, with no query file).
    numbers = {f"{n:04d}" for n in range(1, 30)}
    assert {lint[:4] for lint in RULES} | {lint[:4] for lint in NOT_HERE} == numbers
    assert not RULES.keys() & NOT_HERE.keys()
