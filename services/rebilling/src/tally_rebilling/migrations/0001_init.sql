-- Companies (agencies) and their client accounts.
CREATE TABLE companies (
    id                text PRIMARY KEY,
    name              text NOT NULL,
    plan              text NOT NULL CHECK (plan IN ('starter', 'unlimited', 'saas_pro')),
    owner_email       text NOT NULL,
    currency          text NOT NULL DEFAULT 'USD',
    stripe_account_id text,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    id            text PRIMARY KEY,
    company_id    text NOT NULL REFERENCES companies (id),
    name          text NOT NULL,
    owner_email   text NOT NULL,
    billing_model text NOT NULL CHECK (billing_model IN ('self_billing', 'stripe_connect_automated')),
    saas_plan_id  text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_company ON accounts (company_id);
