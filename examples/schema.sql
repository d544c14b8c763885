-- Physical schema for policies/example.yaml (used by `pgseal demo`).
-- Every encrypted column is bytea: PostgreSQL only ever stores sealed cells.
CREATE ROLE app LOGIN;
CREATE ROLE auditor LOGIN;
CREATE SCHEMA billing;

CREATE TABLE public.patients (
    id         bigserial PRIMARY KEY,
    tenant_id  text NOT NULL,
    ssn        bytea,           -- text, search: equality
    email      bytea,           -- text, search: equality
    name       bytea,           -- text
    dob        bytea,           -- date
    balance    bytea,           -- numeric
    profile    bytea,           -- jsonb
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, ssn)
);
CREATE INDEX patients_email ON public.patients (email);

CREATE TABLE public.payments (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL,
    patient_id  bigint REFERENCES public.patients (id),
    card_number bytea,          -- text, search: equality
    card_holder bytea,          -- text
    amount      bytea,          -- numeric
    paid_at     bytea,          -- timestamptz
    approved    bytea           -- bool
);
CREATE INDEX payments_card ON public.payments (card_number);

CREATE TABLE billing.invoices (
    id        bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    iban      bytea,            -- varchar, search: equality
    total     bytea,            -- numeric
    issued_on bytea             -- date
);
CREATE INDEX invoices_iban ON billing.invoices (iban);

CREATE TABLE public.user_notes (
    id        bigserial PRIMARY KEY,
    body      bytea,            -- text
    rating    bytea,            -- int4
    reference bytea             -- uuid, search: equality
);
CREATE INDEX user_notes_reference ON public.user_notes (reference);

GRANT USAGE ON SCHEMA billing TO app, auditor;
GRANT ALL ON ALL TABLES IN SCHEMA public, billing TO app;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public, billing TO app;
GRANT SELECT ON ALL TABLES IN SCHEMA public, billing TO auditor;

-- Row-level security from the same session tenant pgseal uses: `SET pgseal.tenant`
-- (or the startup option) reaches PostgreSQL too, so a tenant sees only its rows.
-- auditor is in cross_tenant_roles and reads every tenant (each read is audited).
ALTER TABLE public.patients ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.payments ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.invoices ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON public.patients TO app
    USING (tenant_id = current_setting('pgseal.tenant', true));
CREATE POLICY tenant_rows ON public.payments TO app
    USING (tenant_id = current_setting('pgseal.tenant', true));
CREATE POLICY tenant_rows ON billing.invoices TO app
    USING (tenant_id = current_setting('pgseal.tenant', true));
CREATE POLICY every_row ON public.patients TO auditor USING (true);
CREATE POLICY every_row ON public.payments TO auditor USING (true);
CREATE POLICY every_row ON billing.invoices TO auditor USING (true);
