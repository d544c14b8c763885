"""Keys over the data's lifetime: encrypt or decrypt an existing column online, rekey.

`plan` is pure (names, SQL text, pacing); `column`, `rekey`, `jobs` and `common` are the
async shell; `commands` holds the CLI handlers.

Theory of operation: `pgseal migrate encrypt S.T.C`
-----------------------------------------------------
PostgreSQL holds no keys, so nothing inside the database can seal; the migration seals
outside and uses the database only to *notice* changes. The invariant is

    shadow IS NULL  or  shadow = seal(column, row tenant)        (for every row)

1. Prepare (one short transaction, lock_timeout bounded): add the shadow column (bytea,
   NULL everywhere) and a BEFORE INSERT OR UPDATE trigger that sets the shadow to NULL
   whenever a write changes the column's value or the row's tenant. Then build, CONCURRENTLY,
   a partial index of the *pending* rows (shadow IS NULL AND column IS NOT NULL).
2. Backfill: small transactions in primary-key order (or heap page ranges without a key):
   SELECT pending rows ... FOR UPDATE SKIP LOCKED, seal each value exactly as the proxy
   would (its canonical form from PostgreSQL's text output in a UTC/ISO session, the
   tenant's current key, deterministic for `search: equality`), write the shadow, write
   the audit record, checkpoint (in the same transaction when the keystore shares the
   database). A row lock is held from read to write, so the value sealed is the value
   in the row; a write that comes later fires the trigger and makes the row pending
   again. A batch only ever touches pending rows: after a crash or SIGKILL the open
   transaction rolls back, and the next run seals exactly the rows not committed yet.
   Throttled to --rate rows/s.
3. Catch-up passes seal the rows the application wrote meanwhile (found via the index).
4. Cut-over, one transaction: LOCK TABLE ... ACCESS EXCLUSIVE (waiting at most
   lock_timeout, retried after another catch-up pass), seal the last pending rows, check
   that none is left, drop the trigger, DROP the old column, RENAME the shadow to its
   name, ADD a CHECK (NOT VALID) that admits only well-formed cells. Committed, the
   CHECKs are validated without the exclusive lock, and NOT NULL is restored scan-free.

Writes through the proxy go on throughout: the proxy keeps the *old* policy (column not
covered) and writes plaintext, which the trigger turns into pending work. The policy
switch is the operator's: restart the proxies with the policy covering the column right
after the cut-over. In between, the system fails closed, never open: a proxy on the old
policy has its plaintext writes refused by the CHECK (a bytea value that is not a cell)
and reads raw cells; a proxy on the new policy started too early cannot write cells into
the still-plaintext column (type mismatch) and cannot open plaintext. `--no-swap` stops
before the cut-over (the trigger keeps the shadow in sync) so that it can be run at the
moment of the proxies' restart.

`pgseal migrate decrypt` is the same with the roles swapped (the shadow is the plaintext
type, the values opened with the key their header names). Running the opposite
direction on a migration that has not cut over undoes it. `pgseal rekey` re-seals in
place with optimistic writes; see `proxy.migrate.rekey`.
"""
