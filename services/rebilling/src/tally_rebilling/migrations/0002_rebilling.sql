ALTER TABLE companies ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE accounts ADD COLUMN has_valid_card boolean NOT NULL DEFAULT false;

-- Rebilling per account; `version` grows with every change (the compacted topic's order).
CREATE TABLE rebilling (
    account_id text PRIMARY KEY REFERENCES accounts (id),
    mode       text NOT NULL CHECK (mode IN ('off', 'rebill', 'rebill_markup')),
    markups    jsonb NOT NULL DEFAULT '{}',
    version    bigint NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE saas_plans (
    company_id text NOT NULL REFERENCES companies (id),
    id         text NOT NULL,
    name       text NOT NULL,
    mode       text NOT NULL CHECK (mode IN ('off', 'rebill', 'rebill_markup')),
    markups    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, id)
);

-- Reselling: the company's own price per catalog product, subscriptions, and one charge row
-- per subscription per period (the primary key is the exactly-once guarantee).
CREATE TABLE company_prices (
    company_id text NOT NULL REFERENCES companies (id),
    product    text NOT NULL,
    price      bigint NOT NULL CHECK (price >= 0),
    PRIMARY KEY (company_id, product)
);
CREATE TABLE subscriptions (
    id             text PRIMARY KEY,
    account_id     text NOT NULL REFERENCES accounts (id),
    company_id     text NOT NULL,
    product        text NOT NULL,
    deployment     text NOT NULL CHECK (deployment IN ('direct', 'resell')),
    platform_price bigint NOT NULL,
    company_price  bigint NOT NULL,
    status         text NOT NULL DEFAULT 'active',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE subscription_charges (
    subscription_id text NOT NULL REFERENCES subscriptions (id),
    period          text NOT NULL,
    company_id      text NOT NULL,
    platform_amount bigint NOT NULL,
    company_amount  bigint NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'charged', 'failed')),
    error           text,
    charged_at      timestamptz,
    PRIMARY KEY (subscription_id, period)
);

-- Licenses: the company's pool, what each workspace holds, members and invitations.
CREATE TABLE license_pools (
    company_id text PRIMARY KEY REFERENCES companies (id),
    total      integer NOT NULL DEFAULT 0 CHECK (total >= 0)
);
CREATE TABLE account_licenses (
    account_id text PRIMARY KEY REFERENCES accounts (id),
    company_id text NOT NULL,
    assigned   integer NOT NULL DEFAULT 0 CHECK (assigned >= 0)
);
CREATE TABLE members (
    account_id   text NOT NULL REFERENCES accounts (id),
    email        text NOT NULL,
    role         text NOT NULL CHECK (role IN ('owner', 'user', 'agency_admin')),
    is_agency    boolean NOT NULL DEFAULT false,
    joined_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, email)
);
CREATE TABLE invitations (
    id          text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (id),
    email       text NOT NULL,
    role        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('pending', 'accepted')),
    handoff     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    accepted_at timestamptz
);
CREATE UNIQUE INDEX invitations_one_pending ON invitations (account_id, email)
    WHERE status = 'pending';
