-- The expiry sweep: one set-based statement; the capture trigger carries every change to the outbox.

-- name: expire_due_certifications
-- "Passed" means the day after valid_until has begun where the association works (%(today)s).
with expired as (
  update public.certifications
  set status = 'expired'
  where status = 'active' and valid_until < %(today)s
  returning 1
)
select count(*) as expired from expired;

-- name: next_expiry
-- The earliest valid_until among active certifications: the worker sweeps the day after it.
select min(valid_until) as valid_until from public.certifications where status = 'active';

-- name: count_due_certifications
-- What expire_due_certifications would expire now (sweep --dry-run): the same predicate, nothing changed.
select count(*) as due from public.certifications where status = 'active' and valid_until < %(today)s;
