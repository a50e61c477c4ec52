-- Rules the database enforces on certifications, for every writer: coordinators change them through
-- Supabase's API (PostgREST as `authenticated`), not only through certsync's Python. The rules are the
-- domain module's (src/certsync/domain/certification.py), read from a row before and after an UPDATE,
-- with the same rule names; one table of cases (tests/support/rule_cases.py) runs through both.
--
-- A violation fails the statement with SQLSTATE 23514 (check_violation; PostgREST answers 400) and the
-- message "<rule>: <why>"; the rule is also the error's constraint name. The statement fails, so the
-- outbox's capture trigger (AFTER … FOR EACH STATEMENT) never sees a refused change.
--
-- Repair path (documented in docs/security.md): the table owner may, in one transaction,
-- `alter table public.certifications disable trigger certifications_enforce_rules`, repair, and enable
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

-- One appended renewal entry, checked as RenewalEntry.from_json reads it (schema version 1).
create function private.check_renewal_entry(p_entry jsonb) returns void
language plpgsql immutable set search_path = ''
as $$
declare
  v_field text;
begin
  if pg_catalog.jsonb_typeof(p_entry) is distinct from 'object' then
    perform private.refuse_certification_change('renewal_entry_malformed',
      'renewal entry must be a JSON object, got ' || coalesce(pg_catalog.jsonb_typeof(p_entry), 'nothing'));
  end if;
  if not p_entry ? 'schema_version' then
    perform private.refuse_certification_change('renewal_entry_schema_version',
      'renewal entry has no schema_version');
  end if;
  if p_entry -> 'schema_version' <> '1'::jsonb then
    perform private.refuse_certification_change('renewal_entry_schema_version',
      'renewal entry schema_version ' || (p_entry -> 'schema_version')::text || ' is not supported (this code reads 1)');
  end if;
  foreach v_field in array array['renewed_at', 'previous_valid_until', 'new_valid_until', 'renewed_by'] loop
    if pg_catalog.jsonb_typeof(p_entry -> v_field) is distinct from 'string' then
      perform private.refuse_certification_change('renewal_entry_malformed',
        'renewal entry field ''' || v_field || ''' is missing or not text');
    end if;
  end loop;
  if pg_catalog.jsonb_typeof(p_entry -> 'note') not in ('string', 'null') then
    perform private.refuse_certification_change('renewal_entry_malformed', 'renewal entry note must be text or null');
  end if;
  if (p_entry ->> 'renewed_at') !~ '^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?)$' then
    perform private.refuse_certification_change('renewal_entry_malformed',
      'renewal entry renewed_at must be an ISO 8601 timestamp with its UTC offset');
  end if;
  if (p_entry ->> 'previous_valid_until') !~ '^\d{4}-\d{2}-\d{2}$' or (p_entry ->> 'new_valid_until') !~ '^\d{4}-\d{2}-\d{2}$' then
    perform private.refuse_certification_change('renewal_entry_malformed',
      'renewal entry valid_until fields must be ISO dates (YYYY-MM-DD)');
  end if;
  begin
    perform (p_entry ->> 'renewed_at')::timestamptz, (p_entry ->> 'previous_valid_until')::date,
      (p_entry ->> 'new_valid_until')::date, (p_entry ->> 'renewed_by')::uuid;
  exception when data_exception then
    perform private.refuse_certification_change('renewal_entry_malformed', 'renewal entry is malformed: ' || sqlerrm);
  end;
end
$$;

-- The rules, in the order of the domain's appended_renewal() then check_change().
--
-- security definer: every writer passes through it, and service_role has no USAGE on `private`. The
-- writer is still known: PostgREST (and the tests) `set local role`, which a security definer function
-- does not change, so current_setting('role') is `authenticated` for a coordinator's request. The date
-- guards apply to those writers; certsync's own writers (service role, owner) decide them in Python,
-- with their injected clock and the configured zone, and the sweep passes its own "today".
create function private.enforce_certification_rules() returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_kept int := pg_catalog.jsonb_array_length(old.renewal_history);
  v_length int := pg_catalog.jsonb_array_length(new.renewal_history);
  v_entry jsonb;
  v_renewed boolean := false;
  v_operation text;
  v_rule record;
  v_starts text;
  v_dated boolean := pg_catalog.current_setting('role') in ('authenticated', 'anon');
  v_today date;
begin
  if new.id is distinct from old.id then
    perform private.refuse_certification_change('id_is_immutable', 'a certification''s id never changes');
  end if;
  if new.peer_mentor_id is distinct from old.peer_mentor_id then
    perform private.refuse_certification_change('peer_mentor_id_is_immutable',
      'a certification never moves to another peer mentor; revoke it and issue a new one');
  end if;
  if new.created_at is distinct from old.created_at then
    perform private.refuse_certification_change('created_at_is_immutable', 'created_at never changes');
  end if;

  -- renewal_history: only one well-formed append at a time.
  if new.renewal_history is distinct from old.renewal_history then
    -- Whole-array comparisons: each reads the (possibly TOASTed) arrays once, not once per entry.
    if v_length <= v_kept or old.renewal_history is distinct from (
      select coalesce(pg_catalog.jsonb_agg(e.entry order by e.i), '[]'::jsonb)
      from pg_catalog.jsonb_array_elements(new.renewal_history) with ordinality as e (entry, i)
      where e.i <= v_kept
    ) then
      perform private.refuse_certification_change('renewal_history_append_only',
        'renewal history only grows by appending: existing entries may not be edited or removed');
    end if;
    if v_length - v_kept > 1 then
      perform private.refuse_certification_change('one_renewal_per_update',
        'one renewal per update: ' || (v_length - v_kept) || ' entries appended at once');
    end if;
    v_entry := new.renewal_history -> v_kept;
    perform private.check_renewal_entry(v_entry);
    if ((v_entry ->> 'previous_valid_until')::date, (v_entry ->> 'new_valid_until')::date)
       is distinct from (old.valid_until, new.valid_until) then
      perform private.refuse_certification_change('renewal_entry_matches_validity',
        'the renewal entry records ' || (v_entry ->> 'previous_valid_until') || ' → ' || (v_entry ->> 'new_valid_until')
        || ', the change is ' || old.valid_until || ' → ' || new.valid_until);
    end if;
    v_renewed := true;
  end if;

  if old.status = 'revoked' and (new.status, new.valid_from, new.valid_until, new.certification_type, new.renewal_history)
     is distinct from (old.status, old.valid_from, old.valid_until, old.certification_type, old.renewal_history) then
    perform private.refuse_certification_change('revoked_is_final',
      'cannot change a revoked certification: revoked is final');
  end if;
  if not v_renewed and new.valid_until is distinct from old.valid_until then
    perform private.refuse_certification_change('validity_changes_only_by_renewal',
      'valid_until changes only by a renewal, which appends its entry');
  end if;
  if not v_renewed and new.status = old.status then
    return new;
  end if;

  -- A renewal, or the one operation whose target is the new status (domain: CHANGE_OPERATION).
  v_operation := case when v_renewed then 'renew' else case new.status
    when 'active' then 'reinstate' when 'suspended' then 'suspend' when 'expired' then 'expire' else 'revoke' end end;
  select t.to_status, t.guard into v_rule
  from private.certification_transitions() t where t.operation = v_operation and t.from_status = old.status;
  if not found then
    select pg_catalog.string_agg(t.from_status, '_or_' order by t.from_status collate "C") into v_starts
    from private.certification_transitions() t where t.operation = v_operation;
    perform private.refuse_certification_change(v_operation || '_applies_only_to_' || v_starts,
      'cannot ' || v_operation || ': ' || old.status || ' → ' || new.status || ' is not allowed: '
      || v_operation || ' applies only to ' || pg_catalog.replace(v_starts, '_or_', ' or ') || ' certifications');
  end if;
  if v_dated then
    v_today := private.association_today();
    if v_rule.guard = 'validity_not_passed' and old.valid_until < v_today then
      perform private.refuse_certification_change('validity_not_passed',
        'cannot ' || v_operation || ': validity ended on ' || old.valid_until || '; renew it instead');
    elsif v_rule.guard = 'validity_passed' and old.valid_until >= v_today then
      perform private.refuse_certification_change('validity_passed',
        'cannot ' || v_operation || ': still valid until ' || old.valid_until);
    end if;
  end if;
  if v_renewed then
    if new.valid_until < old.valid_until then
      perform private.refuse_certification_change('renewal_never_shortens_validity',
        'new valid_until ' || new.valid_until || ' would shorten validity ending ' || old.valid_until);
    end if;
    if v_dated and new.valid_until < v_today then
      perform private.refuse_certification_change('renewal_end_not_passed',
        'new valid_until ' || new.valid_until || ' has already passed');
    end if;
    if new.status <> v_rule.to_status then
      perform private.refuse_certification_change('renewal_status',
        'a renewal leaves a ' || old.status || ' certification ' || v_rule.to_status);
    end if;
    if v_length > 500 then  -- domain: RENEWAL_HISTORY_WARNING_THRESHOLD; a signal, not a refusal
      raise warning using message = 'renewal_history_long: certification ' || new.id || ' has '
        || v_length || ' renewal entries (threshold 500): see docs/renewal-history.md';
    end if;
  end if;
  return new;
end
$$;

-- Coordinators issue through the API as well: a new certification starts active with an empty history
-- (their INSERT privilege below leaves both to the defaults) and a validity that has not passed.
create function private.enforce_certification_issue() returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if pg_catalog.current_setting('role') in ('authenticated', 'anon') and new.valid_until < private.association_today() then
    perform private.refuse_certification_change('validity_not_passed',
      'cannot issue: validity ended on ' || new.valid_until);
  end if;
  return new;
end
$$;

revoke all on function private.association_today(), private.certification_transitions(),
  private.refuse_certification_change(text, text), private.check_renewal_entry(jsonb),
  private.enforce_certification_rules(), private.enforce_certification_issue()
  from public, anon, authenticated;

-- BEFORE triggers fire in name order: "certifications_bump_version" < "certifications_enforce_rules",
-- so the rules see the version already bumped (they never look at it) and refuse before anything is
-- written; the AFTER statement trigger that writes the outbox runs only if every row passed.
create trigger certifications_enforce_rules
  before update on public.certifications
  for each row execute function private.enforce_certification_rules();
create trigger certifications_enforce_issue
  before insert on public.certifications
  for each row execute function private.enforce_certification_issue();

-- Column privileges: a coordinator changes status, valid_until and renewal_history (suspend, reinstate,
-- revoke, renew), and issues with the identifying and validity columns; id, version, timestamps, status
-- and history of a new row are the database's. Only this table's grants change: the project's default
-- privileges are shared with other apps and left as they are.
revoke insert, update on public.certifications from authenticated;
grant update (status, valid_until, renewal_history) on public.certifications to authenticated;
grant insert (id, peer_mentor_id, certification_type, valid_from, valid_until) on public.certifications
  to authenticated;
