-- Physical schema for tests/data/policy.yaml: every encrypted column is bytea.
DROP TABLE IF EXISTS public.patients, public.payments, public.notes, public.plain_items,
    public.typed_cells, public.typed_plain, public.typed_search, public.contacts, public.dossiers;
CREATE TABLE public.patients (
    id serial PRIMARY KEY,
    tenant_id text NOT NULL,
    ssn bytea,
    name bytea,
    dob bytea,
    balance bytea,
    profile bytea,
    UNIQUE (tenant_id, ssn)
);
CREATE INDEX patients_ssn ON public.patients (ssn);
CREATE TABLE public.payments (
    id serial PRIMARY KEY,
    tenant_id text NOT NULL,
    card_number bytea,
    amount bytea,
    paid_at bytea
);
CREATE INDEX payments_card ON public.payments (card_number);
CREATE TABLE public.notes (
    id serial PRIMARY KEY,
    body bytea,
    rating bytea
);
CREATE TABLE public.plain_items (id serial PRIMARY KEY, label text);
-- One encrypted column of every declared type (DESIGN.md 5), and a mirror of real types.
CREATE TABLE public.typed_cells (
    id int NOT NULL,
    tenant_id text NOT NULL,
    c_text bytea,
    c_varchar bytea,
    c_int2 bytea,
    c_int4 bytea,
    c_int8 bytea,
    c_float4 bytea,
    c_float8 bytea,
    c_numeric bytea,
    c_bool bytea,
    c_date bytea,
    c_time bytea,
    c_timestamp bytea,
    c_timestamptz bytea,
    c_uuid bytea,
    c_json bytea,
    c_jsonb bytea,
    c_bytea bytea,
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE public.typed_plain (
    id int NOT NULL,
    tenant_id text NOT NULL,
    c_text text,
    c_varchar varchar,
    c_int2 int2,
    c_int4 int4,
    c_int8 int8,
    c_float4 float4,
    c_float8 float8,
    c_numeric numeric,
    c_bool bool,
    c_date date,
    c_time time,
    c_timestamp timestamp,
    c_timestamptz timestamptz,
    c_uuid uuid,
    c_json json,
    c_jsonb jsonb,
    c_bytea bytea,
    PRIMARY KEY (tenant_id, id)
);
-- The same types as `search: equality` columns.
CREATE TABLE public.typed_search (
    id int NOT NULL,
    tenant_id text NOT NULL,
    s_text bytea,
    s_varchar bytea,
    s_int2 bytea,
    s_int4 bytea,
    s_int8 bytea,
    s_float4 bytea,
    s_float8 bytea,
    s_numeric bytea,
    s_bool bytea,
    s_date bytea,
    s_time bytea,
    s_timestamp bytea,
    s_timestamptz bytea,
    s_uuid bytea,
    s_json bytea,
    s_jsonb bytea,
    s_bytea bytea,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX typed_search_text ON public.typed_search (s_text);
CREATE INDEX typed_search_varchar ON public.typed_search (s_varchar);
CREATE INDEX typed_search_int2 ON public.typed_search (s_int2);
CREATE INDEX typed_search_int4 ON public.typed_search (s_int4);
CREATE INDEX typed_search_int8 ON public.typed_search (s_int8);
CREATE INDEX typed_search_float4 ON public.typed_search (s_float4);
CREATE INDEX typed_search_float8 ON public.typed_search (s_float8);
CREATE INDEX typed_search_numeric ON public.typed_search (s_numeric);
CREATE INDEX typed_search_bool ON public.typed_search (s_bool);
CREATE INDEX typed_search_date ON public.typed_search (s_date);
CREATE INDEX typed_search_time ON public.typed_search (s_time);
CREATE INDEX typed_search_timestamp ON public.typed_search (s_timestamp);
CREATE INDEX typed_search_timestamptz ON public.typed_search (s_timestamptz);
CREATE INDEX typed_search_uuid ON public.typed_search (s_uuid);
CREATE INDEX typed_search_json ON public.typed_search (s_json);
CREATE INDEX typed_search_jsonb ON public.typed_search (s_jsonb);
CREATE INDEX typed_search_bytea ON public.typed_search (s_bytea);
-- Tables with decrypt_roles: on_denied null (contacts) and error (dossiers).
CREATE TABLE public.contacts (
    id serial PRIMARY KEY,
    tenant_id text NOT NULL,
    email bytea,
    phone bytea
);
CREATE INDEX contacts_email ON public.contacts (email);
CREATE TABLE public.dossiers (
    id serial PRIMARY KEY,
    tenant_id text NOT NULL,
    summary bytea
);

-- Application-shaped tables for the statement table, the ORM and the rotation tests.
DROP TABLE IF EXISTS public.orders, public.customers, public.tickets, public.vault_items CASCADE;
DROP SCHEMA IF EXISTS crm CASCADE;
CREATE TABLE public.customers (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL DEFAULT current_setting('pgseal.tenant', true),
    email bytea,
    full_name bytea,
    birth_date bytea,
    credit_limit bytea,
    prefs bytea,
    status text NOT NULL DEFAULT 'active',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email)
);
CREATE INDEX customers_email ON public.customers (email);
CREATE TABLE public.orders (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL DEFAULT current_setting('pgseal.tenant', true),
    customer_id bigint REFERENCES public.customers (id) ON DELETE CASCADE,
    reference bytea,
    total bytea,
    note bytea,
    placed_at bytea,
    quantity integer NOT NULL DEFAULT 1
);
CREATE INDEX orders_reference ON public.orders (reference);
CREATE INDEX orders_customer ON public.orders (customer_id);
-- Session-tenant table: no tenant column; `owner` is a plain copy for clean-up only.
CREATE TABLE public.tickets (
    id bigserial PRIMARY KEY,
    owner text DEFAULT current_setting('pgseal.tenant', true),
    subject bytea,
    body bytea,
    priority bytea,
    opened_on bytea,
    closed boolean NOT NULL DEFAULT false
);
CREATE INDEX tickets_subject ON public.tickets (subject);
CREATE SCHEMA crm;
CREATE TABLE crm."Contacts" (
    "Id" serial PRIMARY KEY,
    "TenantId" text NOT NULL,
    "PhoneNumber" bytea,
    "DisplayName" bytea,
    "Vip" bytea
);
CREATE INDEX contacts_phone ON crm."Contacts" ("PhoneNumber");
CREATE TABLE public.vault_items (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    secret_ref bytea,
    payload bytea,
    amount bytea
);
CREATE INDEX vault_items_ref ON public.vault_items (secret_ref);
