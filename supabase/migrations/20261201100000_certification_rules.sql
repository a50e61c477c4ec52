-- Rules the database enforces on certifications, for every writer: coordinators change them through
-- Supabase's API (PostgREST as `authenticated`), not only through certsync's Python. The rules are the
-- domain module's (src/certsync/domain/certification.py), read from a row before and after an UPDATE,
-- with the same rule names; one table of cases (tests/support/rule_cases.py) runs through both.
--
-- A violation fails the statement with SQLSTATE 23514 (check_violation; PostgREST answers 400) and the
-- message "<rule>: <why>"; the rule is also the error's constraint name. The whole statement fails, so
-- no refused change reaches the outbox.
--
-- Set-based: the rules run once per statement over its transition tables (one hash join and a CASE
-- per row), so the sweep's 100k-row UPDATE pays for a join, not for a PL/pgSQL call per row.
--
-- Repair path (documented in docs/security.md): the table owner may, in one transaction,
-- `alter table public.certifications disable trigger certifications_assert_rules`, repair, and enable
-- it again. Nobody else can: disabling a trigger needs ownership of the table.

-- "Today" for the date guards of `authenticated` writers: the association's day, as CERTSYNC_TIMEZONE.
insert into private.settings (key, value) values ('timezone', '"Europe/Oslo"'::jsonb)
on conflict (key) do nothing;

create function private.association_today() returns date
language sql stable security definer set search_path = ''
as $$
  select (pg_catalog.now() at time zone coalesce(
    (select s.value #>> '{}' from private.settings s where s.key = 'timezone'), 'UTC'))::date
$$;

-- The domain's TRANSITIONS, row for row (a test compares the two): where an operation may start, where
-- it leads, and the guard it must pass (validity_not_passed / validity_passed, or none).
create function private.certification_transitions()
returns table (operation text, from_status text, to_status text, guard text)
language sql immutable set search_path = ''
as $$
  values
    ('renew', 'active', 'active', null::text),
    ('renew', 'expired', 'active', null),
    ('renew', 'suspended', 'suspended', null),
    ('suspend', 'active', 'suspended', null),
    ('reinstate', 'suspended', 'active', 'validity_not_passed'),
    ('revoke', 'active', 'revoked', null),
    ('revoke', 'suspended', 'revoked', null),
    ('revoke', 'expired', 'revoked', null),
    ('expire', 'active', 'expired', 'validity_passed')
$$;

create function private.refuse_certification_change(p_rule text, p_reason text) returns void
language plpgsql immutable set search_path = ''
as $$
begin
  raise exception using
    errcode = 'check_violation', message = p_rule || ': ' || p_reason, constraint = p_rule,
    schema = 'public', table = 'certifications';
end
$$;

-- What is wrong with one appended renewal entry, as RenewalEntry.from_json reads it (schema version 1):
-- "<rule>: <why>", or null.
create function private.renewal_entry_violation(p_entry jsonb) returns text
language plpgsql immutable set search_path = ''
as $$
declare
  v_field text;
begin
  if pg_catalog.jsonb_typeof(p_entry) is distinct from 'object' then
    return 'renewal_entry_malformed: renewal entry must be a JSON object, got '
      || coalesce(pg_catalog.jsonb_typeof(p_entry), 'nothing');
  end if;
  if not p_entry ? 'schema_version' then
    return 'renewal_entry_schema_version: renewal entry has no schema_version';
  end if;
  if p_entry -> 'schema_version' <> '1'::jsonb then
    return 'renewal_entry_schema_version: renewal entry schema_version '
      || (p_entry -> 'schema_version')::text || ' is not supported (this code reads 1)';
  end if;
  foreach v_field in array array['renewed_at', 'previous_valid_until', 'new_valid_until', 'renewed_by'] loop
    if pg_catalog.jsonb_typeof(p_entry -> v_field) is distinct from 'string' then
      return 'renewal_entry_malformed: renewal entry field ''' || v_field || ''' is missing or not text';
    end if;
  end loop;
  if pg_catalog.jsonb_typeof(p_entry -> 'note') not in ('string', 'null') then
    return 'renewal_entry_malformed: renewal entry note must be text or null';
  end if;
  -- The formats RenewalEntry.to_json writes and from_json accepts (the same patterns there).
  if (p_entry ->> 'renewed_at') !~ '^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?)$' then
    return 'renewal_entry_malformed: renewal entry renewed_at must be a timezone-aware ISO 8601 timestamp (with its UTC offset)';
  end if;
  if (p_entry ->> 'previous_valid_until') !~ '^\d{4}-\d{2}-\d{2}$'
     or (p_entry ->> 'new_valid_until') !~ '^\d{4}-\d{2}-\d{2}$' then
    return 'renewal_entry_malformed: renewal entry is malformed: valid_until fields must be ISO dates (YYYY-MM-DD)';
  end if;
  if (p_entry ->> 'renewed_by') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    return 'renewal_entry_malformed: renewal entry is malformed: renewed_by must be a uuid';
  end if;
  begin
    perform (p_entry ->> 'renewed_at')::timestamptz, (p_entry ->> 'previous_valid_until')::date,
      (p_entry ->> 'new_valid_until')::date;
  exception when data_exception then
    return 'renewal_entry_malformed: renewal entry is malformed: ' || sqlerrm;
  end;
  return null;
end
$$;

-- What is wrong with a change of renewal_history (domain: appended_renewal): "<rule>: <why>", or null
-- when it appends one well-formed entry recording the change of valid_until. Called only for the rows
-- whose history changed.
create function private.renewal_history_violation(
  p_history jsonb, p_new_history jsonb, p_valid_until date, p_new_valid_until date
) returns text
language plpgsql immutable set search_path = ''
as $$
declare
  v_kept int := pg_catalog.jsonb_array_length(p_history);
  v_length int := pg_catalog.jsonb_array_length(p_new_history);
  v_entry jsonb := p_new_history -> v_kept;
  v_problem text;
begin
  -- Whole-array comparisons: each reads the (possibly TOASTed) arrays once, not once per entry.
  if v_length <= v_kept or p_history is distinct from (
    select coalesce(pg_catalog.jsonb_agg(e.entry order by e.i), '[]'::jsonb)
    from pg_catalog.jsonb_array_elements(p_new_history) with ordinality as e (entry, i)
    where e.i <= v_kept
  ) then
    return 'renewal_history_append_only: renewal history only grows by appending: '
      || 'existing entries may not be edited or removed';
  end if;
  if v_length - v_kept > 1 then
    return 'one_renewal_per_update: one renewal per update: ' || (v_length - v_kept) || ' entries appended at once';
  end if;
  v_problem := private.renewal_entry_violation(v_entry);
  if v_problem is not null then
    return v_problem;
  end if;
  if ((v_entry ->> 'previous_valid_until')::date, (v_entry ->> 'new_valid_until')::date)
     is distinct from (p_valid_until, p_new_valid_until) then
    return 'renewal_entry_matches_validity: the renewal entry records ' || (v_entry ->> 'previous_valid_until')
      || ' → ' || (v_entry ->> 'new_valid_until') || ', the change is ' || p_valid_until || ' → ' || p_new_valid_until;
  end if;
  return null;
end
$$;

-- Whether the writer is held to the association's day. PostgREST (and the tests) `set local role`,
-- which a security definer function does not change, so current_setting('role') is `authenticated` for
-- a coordinator's request. certsync's own writers (service role, owner) decide the date guards in
-- Python, with their injected clock and zone, and the sweep passes its own "today".
create function private.is_api_writer() returns boolean
language sql stable set search_path = ''
as $$
  select pg_catalog.current_setting('role') in ('authenticated', 'anon')
$$;

-- The rules, once per UPDATE statement over its transition tables, in the order of the domain's
-- appended_renewal() then check_change(). security definer: every writer passes through it, and
-- service_role has no USAGE on `private`. Rows are matched on id, which the row trigger below keeps.
-- Transition tables have no statistics: the planner would take them for a few rows and join 100k
-- old rows to 100k new ones in a nested loop. Hash joins it is.
create function private.enforce_certification_rules() returns trigger
language plpgsql security definer set search_path = '' set enable_nestloop = off
as $$
declare
  v_dated boolean := private.is_api_writer();
  v_today date := private.association_today();
  v_violation text;
  v_long record;
begin
  with transitions as materialized (
    select * from private.certification_transitions()
  ),
  starts as (
    select t.operation,
           pg_catalog.string_agg(t.from_status, '_or_' order by t.from_status collate "C") as names
    from transitions t group by t.operation
  )
  select v.violation into v_violation
  from old_rows o
  join new_rows n on n.id = o.id
  cross join lateral (
    select o.renewal_history is distinct from n.renewal_history as renewed
  ) r
  -- A renewal, or the one operation whose target is the new status (domain: CHANGE_OPERATION).
  cross join lateral (
    select case when r.renewed then 'renew' else case n.status
      when 'active' then 'reinstate' when 'suspended' then 'suspend' when 'expired' then 'expire'
      else 'revoke' end end as operation
  ) op
  left join transitions t on t.operation = op.operation and t.from_status = o.status
  left join starts s on s.operation = op.operation
  cross join lateral (
    select case when r.renewed then private.renewal_history_violation(
      o.renewal_history, n.renewal_history, o.valid_until, n.valid_until) end as history
  ) h
  cross join lateral (
    select case
      when h.history is not null
        then h.history
      when o.status = 'revoked'
           and (n.status, n.valid_from, n.valid_until, n.certification_type, r.renewed)
               is distinct from (o.status, o.valid_from, o.valid_until, o.certification_type, false)
        then 'revoked_is_final: cannot change a revoked certification: revoked is final'
      when not r.renewed and n.valid_until <> o.valid_until
        then 'validity_changes_only_by_renewal: valid_until changes only by a renewal, which appends its entry'
      when not r.renewed and n.status = o.status
        then null
      when t.operation is null
        then op.operation || '_applies_only_to_' || s.names || ': cannot ' || op.operation || ': '
          || o.status || ' → ' || n.status || ' is not allowed: ' || op.operation || ' applies only to '
          || pg_catalog.replace(s.names, '_or_', ' or ') || ' certifications'
      when v_dated and t.guard = 'validity_not_passed' and o.valid_until < v_today
        then 'validity_not_passed: cannot ' || op.operation || ': validity ended on ' || o.valid_until
          || '; renew it instead'
      when v_dated and t.guard = 'validity_passed' and o.valid_until >= v_today
        then 'validity_passed: cannot ' || op.operation || ': still valid until ' || o.valid_until
      when r.renewed and n.valid_until < o.valid_until
        then 'renewal_never_shortens_validity: new valid_until ' || n.valid_until
          || ' would shorten validity ending ' || o.valid_until
      when r.renewed and v_dated and n.valid_until < v_today
        then 'renewal_end_not_passed: new valid_until ' || n.valid_until || ' has already passed'
      when r.renewed and n.status <> t.to_status
        then 'renewal_status: a renewal leaves a ' || o.status || ' certification ' || t.to_status
    end as violation
  ) v
  where v.violation is not null
  limit 1;

  if v_violation is not null then
    perform private.refuse_certification_change(pg_catalog.split_part(v_violation, ': ', 1),
      pg_catalog.substr(v_violation, pg_catalog.strpos(v_violation, ': ') + 2));
  end if;

  -- domain: RENEWAL_HISTORY_WARNING_THRESHOLD; a signal, not a refusal.
  for v_long in
    select n.id, pg_catalog.jsonb_array_length(n.renewal_history) as entries
    from old_rows o join new_rows n on n.id = o.id
    where n.renewal_history is distinct from o.renewal_history
      and pg_catalog.jsonb_array_length(n.renewal_history) > 500
  loop
    raise warning using message = 'renewal_history_long: certification ' || v_long.id || ' has '
      || v_long.entries || ' renewal entries (threshold 500): see docs/renewal-history.md';
  end loop;
  return null;
end
$$;

-- id, peer_mentor_id and created_at never change. The trigger's WHEN clause makes it fire only for a
-- row that breaks the rule, so a valid update pays nothing for it.
create function private.refuse_identity_change() returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if new.id is distinct from old.id then
    perform private.refuse_certification_change('id_is_immutable', 'a certification''s id never changes');
  elsif new.peer_mentor_id is distinct from old.peer_mentor_id then
    perform private.refuse_certification_change('peer_mentor_id_is_immutable',
      'a certification never moves to another peer mentor; revoke it and issue a new one');
  end if;
  perform private.refuse_certification_change('created_at_is_immutable', 'created_at never changes');
  return null;
end
$$;

-- Coordinators issue through the API as well: a new certification starts active with an empty history
-- (their INSERT privilege below leaves both to the defaults) and a validity that has not passed. The
-- trigger fires only for API writers (its WHEN clause).
create function private.enforce_certification_issue() returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if new.valid_until < private.association_today() then
    perform private.refuse_certification_change('validity_not_passed',
      'cannot issue: validity ended on ' || new.valid_until);
  end if;
  return new;
end
$$;

revoke all on function private.association_today(), private.certification_transitions(),
  private.refuse_certification_change(text, text), private.renewal_entry_violation(jsonb),
  private.renewal_history_violation(jsonb, jsonb, date, date), private.is_api_writer(),
  private.enforce_certification_rules(), private.refuse_identity_change(),
  private.enforce_certification_issue()
  from public, anon, authenticated;

create trigger certifications_keep_identity
  before update on public.certifications
  for each row
  when (old.id is distinct from new.id or old.peer_mentor_id is distinct from new.peer_mentor_id
        or old.created_at is distinct from new.created_at)
  execute function private.refuse_identity_change();
-- AFTER statement triggers fire in name order: "certifications_assert_rules" before
-- "certifications_capture_updates", so a refused statement stops before the outbox is written (and
-- were it written, the failing statement would take it along).
create trigger certifications_assert_rules
  after update on public.certifications
  referencing old table as old_rows new table as new_rows
  for each statement execute function private.enforce_certification_rules();
create trigger certifications_enforce_issue
  before insert on public.certifications
  for each row
  when (pg_catalog.current_setting('role') in ('authenticated', 'anon'))
  execute function private.enforce_certification_issue();

-- Column privileges: a coordinator changes status, valid_until and renewal_history (suspend, reinstate,
-- revoke, renew), and issues with the identifying and validity columns; id, version, timestamps, status
-- and history of a new row are the database's. Only this table's grants change: the project's default
-- privileges are shared with other apps and left as they are.
revoke insert, update on public.certifications from authenticated;
grant update (status, valid_until, renewal_history) on public.certifications to authenticated;
grant insert (id, peer_mentor_id, certification_type, valid_from, valid_until) on public.certifications
  to authenticated;
