-- Privileges around the policies (issue 12). An audit of the migrated schema as a hostile user found no
-- row leak through the RLS policies, but found ways around them; this migration closes each
-- (docs/security.md, "Privileges" and "Access audit"; tests/integration/test_privileges.py and
-- test_rls_emergency_and_audit.py).

-- ---------------------------------------------------------------------------------------------------
-- 1. Sequences. Supabase's default privileges grant anon and authenticated ALL on every sequence created
-- in public, identity columns' sequences included, and RLS does not cover sequences: anon could setval
-- the retry queue's sequence to its maximum and no failed delivery could be queued again. The defaults
-- stay as they are (other applications share the schema); each migration revokes on the sequences it
-- creates, as here, and a lint test names any sequence an API role can use.
revoke all on sequence public.dynamics_sync_retry_queue_id_seq from public, anon, authenticated;
revoke all on sequence private.access_audit_id_seq from public, anon, authenticated;

-- ---------------------------------------------------------------------------------------------------
-- 2. Supabase's linter (splinter 0001, unindexed_foreign_keys): the retry queue's event_id references the
-- outbox `on delete set null`, so pruning delivered events scanned the whole queue for each one.
create index dynamics_sync_retry_queue_event_id_idx on public.dynamics_sync_retry_queue (event_id);

-- ---------------------------------------------------------------------------------------------------
-- 3. The access audit cannot be forged, silenced or overheard.
--
-- Before: a read in a read-only transaction (every PostgREST GET) was announced with a NOTIFY whose JSON
-- payload a listener stored as it came. Anyone may NOTIFY any channel (no privilege exists for it), so a
-- record could be forged; one malformed payload made the listener's insert fail and drop its connection,
-- losing the notifications sent meanwhile; and anyone may LISTEN, so every session heard who read which
-- certification and the other organisation's id. And `private.audit_certification_read`, which
-- authenticated must be able to execute because the SELECT policy calls it, answered for any pair of ids
-- a caller passed: a LOG line naming the mentor's other organisations, and an inserted audit row.
--
-- Now: the database writes every record itself, from auth.uid() and its own tables, never from anything
-- a client sent. In a read-write transaction it inserts the row. In a read-only one no table can be
-- written, so the record travels in a notification sealed with a key only the database owner can read:
-- nonce ‖ (record XOR SHA-256 keystream) ‖ HMAC-SHA-256(nonce ‖ ciphertext), hex. A listener hears only
-- that opaque token; a forged, altered or malformed one fails the MAC and is rejected (counted, logged,
-- the listener carries on); a replayed one finds its nonce already recorded. Built from PostgreSQL's own
-- sha256() and gen_random_uuid(): pgcrypto is on Supabase but not in every local server certsync runs on.

-- nonce: the sealed notification's, for the records that came by one (a replay finds it taken); null for
-- the records inserted in the reading or writing transaction itself, which cost no index entry for it.
alter table private.access_audit
  add column operation text not null default 'read' check (operation in ('read', 'insert', 'update')),
  add column nonce uuid;
create unique index access_audit_nonce_idx on private.access_audit (nonce) where nonce is not null;
comment on column private.access_audit.read_at is 'When the certification was read or written.';

-- The sealing key: one row, made here from the server's strong random source, readable by the owner only.
create table private.access_audit_key (
  singleton boolean primary key default true check (singleton),
  enc_key bytea not null check (length(enc_key) = 32),
  mac_inner bytea not null check (length(mac_inner) = 64),   -- HMAC's (key ‖ 0…) XOR 0x36…
  mac_outer bytea not null check (length(mac_outer) = 64)    -- HMAC's (key ‖ 0…) XOR 0x5c…
);
revoke all on private.access_audit_key from public, anon, authenticated, service_role;
alter table private.access_audit_key enable row level security;

with raw as (
  select sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')) as enc,
         sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'))
           || decode(repeat('00', 32), 'hex') as mac
)
insert into private.access_audit_key (enc_key, mac_inner, mac_outer)
select enc,
       substring(varbit_send(('x' || encode(mac, 'hex'))::varbit # ('x' || repeat('36', 64))::varbit) from 5),
       substring(varbit_send(('x' || encode(mac, 'hex'))::varbit # ('x' || repeat('5c', 64))::varbit) from 5)
from raw;

-- The keystream cipher: data XOR (SHA-256(key ‖ nonce ‖ 0) ‖ SHA-256(key ‖ nonce ‖ 1) ‖ …). Its own
-- inverse; a nonce is never used twice (a fresh 122-bit random uuid per record).
create function private.access_audit_cipher(p_data bytea, p_nonce bytea) returns bytea
language plpgsql stable set search_path = ''
as $$
declare
  v_stream bytea := ''::bytea;
  v_key bytea := (select k.enc_key from private.access_audit_key k);
begin
  for i in 0 .. (length(p_data) - 1) / 32 loop
    v_stream := v_stream || sha256(v_key || p_nonce || int4send(i));
  end loop;
  return substring(varbit_send(
      ('x' || encode(p_data, 'hex'))::varbit
    # ('x' || encode(substring(v_stream from 1 for length(p_data)), 'hex'))::varbit) from 5);
end
$$;

-- Record layout (bytes): 1 version (= 1) ‖ 8 read_at, µs since the epoch ‖ 16 reader ‖ 16 certification ‖
-- 16 peer mentor ‖ 16 per foreign organisation (at least one). Sealed: nonce ‖ ciphertext ‖ tag, in hex.
create function private.seal_access_record(p_record bytea) returns text
language plpgsql volatile set search_path = ''
as $$
declare
  v_nonce bytea := uuid_send(gen_random_uuid());
  v_cipher bytea := private.access_audit_cipher(p_record, v_nonce);
begin
  return encode(v_nonce || v_cipher || (
    select sha256(k.mac_outer || sha256(k.mac_inner || v_nonce || v_cipher)) from private.access_audit_key k
  ), 'hex');
end
$$;

-- Stores the record a sealed notification carries; false, and nothing stored, for anything else: a
-- malformed or forged token, or one already recorded (a replay). Never raises for what a client can send.
create function private.record_access_notification(p_token text) returns boolean
language plpgsql volatile set search_path = ''
as $$
declare
  v_sealed bytea;
  v_nonce bytea;
  v_cipher bytea;
  v_record bytea;
  v_micros bigint;
begin
  begin
    v_sealed := decode(p_token, 'hex');
  exception when data_exception then
    return false;
  end;
  -- nonce (16) + the smallest record (73) + tag (32)
  if v_sealed is null or length(v_sealed) < 121 then
    return false;
  end if;
  v_nonce := substring(v_sealed from 1 for 16);
  v_cipher := substring(v_sealed from 17 for length(v_sealed) - 48);
  if substring(v_sealed from length(v_sealed) - 31) is distinct from (
    select sha256(k.mac_outer || sha256(k.mac_inner || v_nonce || v_cipher)) from private.access_audit_key k
  ) then
    return false;
  end if;
  v_record := private.access_audit_cipher(v_cipher, v_nonce);
  if get_byte(v_record, 0) <> 1 or (length(v_record) - 57) % 16 <> 0 then
    return false;
  end if;
  v_micros := ('x' || encode(substring(v_record from 2 for 8), 'hex'))::bit(64)::bigint;
  insert into private.access_audit
    (nonce, read_at, reader_id, certification_id, peer_mentor_id, foreign_organisation_ids, operation)
  values (
    encode(v_nonce, 'hex')::uuid,
    timestamptz 'epoch' + v_micros * interval '1 microsecond',
    encode(substring(v_record from 10 for 16), 'hex')::uuid,
    encode(substring(v_record from 26 for 16), 'hex')::uuid,
    encode(substring(v_record from 42 for 16), 'hex')::uuid,
    array(select encode(substring(v_record from 58 + 16 * i for 16), 'hex')::uuid
          from generate_series(0, (length(v_record) - 57) / 16 - 1) as i order by i),
    'read')
  on conflict (nonce) where nonce is not null do nothing;
  return found;
end
$$;

-- While the audit is off this tells nobody anything: the set is empty.
create or replace function private.cross_organisation_mentor_ids() returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select distinct pm.id
  from public.peer_mentors pm
  join public.chapter_memberships m on m.user_id = pm.user_id
  join public.chapters c on c.id = m.chapter_id
  where private.access_audit_enabled()
    and pm.id in (select private.visible_mentor_ids())
    and c.organisation_id not in (select private.my_organisation_ids())
$$;

-- Called by the certifications SELECT policy for the rows of cross_organisation_mentor_ids(), and
-- callable directly by any signed-in user (a policy's functions run with the caller's privileges). So it
-- trusts neither argument: it records only a certification that belongs to that mentor whom the caller
-- (auth.uid()) coordinates, and for any other pair does nothing. It answers nothing either way: it
-- returns true, raises no message, and its notification is sealed.
create or replace function private.audit_certification_read(p_certification_id uuid, p_peer_mentor_id uuid)
returns boolean
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_reader uuid := (select auth.uid());
  v_foreign uuid[];
  v_token text;
begin
  if v_reader is null
     or not coalesce((select s.value = 'true'::jsonb from private.settings s where s.key = 'access_audit_enabled'),
                     false) then
    return true;
  end if;
  -- One statement, written out rather than calling the policies' helpers: this runs once per
  -- cross-organisation row, and each function call would cost as much as the lookups themselves (docs/security.md, "Its cost"). Only a certification of that mentor,
  -- whom the caller coordinates (not themselves), and only the mentor's organisations the caller is not in.
  select array_agg(distinct c.organisation_id order by c.organisation_id) into v_foreign
  from public.certifications cert
  join public.peer_mentors pm on pm.id = cert.peer_mentor_id
  join public.chapter_memberships m on m.user_id = pm.user_id
  join public.chapters c on c.id = m.chapter_id
  where cert.id = p_certification_id
    and cert.peer_mentor_id = p_peer_mentor_id
    and pm.user_id <> v_reader
    and exists (
      select 1
      from public.chapter_memberships theirs
      join public.chapter_memberships mine
        on mine.chapter_id = theirs.chapter_id and mine.role = 'coordinator' and mine.user_id = v_reader
      where theirs.user_id = pm.user_id and theirs.role = 'peer_mentor'
    )
    and not exists (
      select 1
      from public.chapter_memberships mine
      join public.chapters mine_c on mine_c.id = mine.chapter_id
      where mine.user_id = v_reader and mine_c.organisation_id = c.organisation_id
    );
  if v_foreign is null then
    return true;
  end if;
  if current_setting('transaction_read_only') = 'on' then
    -- PostgREST runs GETs read-only, where no table can be written, and refusing the read would be worse
    -- than not recording it: the sealed record goes to the recorder (certsync worker) by NOTIFY and to the
    -- server log, from which private.record_access_notification() can recover it if no recorder ran.
    v_token := private.seal_access_record(
      '\x01'::bytea
      || int8send((extract(epoch from now()) * 1000000)::bigint)
      || uuid_send(v_reader) || uuid_send(p_certification_id) || uuid_send(p_peer_mentor_id)
      || (select string_agg(uuid_send(o), ''::bytea order by o) from unnest(v_foreign) as o));
    raise log 'certsync_access_audit sealed=%', v_token;
    perform pg_notify('certsync_access_audit', v_token);
  else
    insert into private.access_audit (reader_id, certification_id, peer_mentor_id, foreign_organisation_ids)
    values (v_reader, p_certification_id, p_peer_mentor_id, v_foreign);
  end if;
  return true;
end
$$;

-- Writes: a coordinator's insert or update of a certification whose mentor also belongs to an organisation
-- where the coordinator holds no membership. Writes run read-write, so the row is inserted in the writing
-- transaction (and rolled back with it). The service's own writes (sweep, worker) carry no auth.uid().
create function private.audit_certification_writes() returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_writer uuid := (select auth.uid());
begin
  if v_writer is null or not private.access_audit_enabled() then
    return null;
  end if;
  insert into private.access_audit (reader_id, certification_id, peer_mentor_id, foreign_organisation_ids, operation)
  -- One set-based statement for the whole write: the writer's organisations are hashed once.
  select v_writer, n.id, n.peer_mentor_id, array_agg(distinct c.organisation_id order by c.organisation_id),
         lower(tg_op)
  from new_rows n
  join public.peer_mentors pm on pm.id = n.peer_mentor_id
  join public.chapter_memberships m on m.user_id = pm.user_id
  join public.chapters c on c.id = m.chapter_id
  where c.organisation_id not in (
    select mine_c.organisation_id
    from public.chapter_memberships mine
    join public.chapters mine_c on mine_c.id = mine.chapter_id
    where mine.user_id = v_writer
  )
  group by n.id, n.peer_mentor_id;
  return null;
end
$$;

create trigger certifications_audit_inserts
  after insert on public.certifications
  referencing new table as new_rows
  for each statement execute function private.audit_certification_writes();

create trigger certifications_audit_updates
  after update on public.certifications
  referencing new table as new_rows
  for each statement execute function private.audit_certification_writes();

-- The payload-trusting recorder goes; the listing says what each access was.
drop function private.record_cross_organisation_read(jsonb);
drop function private.cross_organisation_reads(timestamptz);
create function private.cross_organisation_reads(p_since timestamptz default now() - interval '7 days')
returns table (read_at timestamptz, reader_id uuid, certification_id uuid, peer_mentor_id uuid,
               foreign_organisation_ids uuid[], operation text)
language sql stable security definer set search_path = ''
as $$
  select a.read_at, a.reader_id, a.certification_id, a.peer_mentor_id, a.foreign_organisation_ids, a.operation
  from private.access_audit a where a.read_at >= p_since order by a.read_at desc, a.id desc
$$;

-- PostgreSQL lets PUBLIC execute every new function; none of these is for the API roles.
revoke all on function private.access_audit_cipher(bytea, bytea),
  private.seal_access_record(bytea), private.record_access_notification(text),
  private.audit_certification_writes(),
  private.cross_organisation_reads(timestamptz)
  from public, anon, authenticated;
