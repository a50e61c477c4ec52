-- Certification queries: issue, lock, read, change status, renew. `version` and `updated_at` are
-- never written here: the certifications_bump_version trigger owns them.

-- name: insert_certification
insert into public.certifications
  (id, peer_mentor_id, certification_type, status, valid_from, valid_until)
values
  (coalesce(%(id)s::uuid, gen_random_uuid()), %(peer_mentor_id)s, %(certification_type)s, %(status)s,
   %(valid_from)s, %(valid_until)s)
returning id, peer_mentor_id, certification_type, status, valid_from, valid_until, renewal_history, version;

-- name: get_certification
select id, peer_mentor_id, certification_type, status, valid_from, valid_until, renewal_history, version
from public.certifications
where id = %(id)s;

-- name: lock_certification
-- The row is locked until the transaction ends, so the domain decides on the state that the
-- UPDATE will change (a concurrent change waits, then decides on the result of this one).
select id, peer_mentor_id, certification_type, status, valid_from, valid_until, renewal_history, version
from public.certifications
where id = %(id)s
for update;

-- name: update_certification_status
update public.certifications
set status = %(status)s
where id = %(id)s
returning id, peer_mentor_id, certification_type, status, valid_from, valid_until, renewal_history, version;

-- name: append_certification_renewal
-- The entry is appended by PostgreSQL from the row's current value, never written back from a
-- copy read earlier, so no writer can lose another's entry. %(entries)s is a one-element array.
update public.certifications
set status = %(status)s,
    valid_until = %(valid_until)s,
    renewal_history = renewal_history || %(entries)s::jsonb
where id = %(id)s
returning id, peer_mentor_id, certification_type, status, valid_from, valid_until, renewal_history, version,
          jsonb_array_length(renewal_history) as renewal_count;
