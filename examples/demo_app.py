"""A tiny application behind pgseal: it writes and reads plaintext through the proxy;
then the same rows are read straight from PostgreSQL to show what is stored.

    python examples/demo_app.py PROXY_DSN DIRECT_DSN
"""

from __future__ import annotations

import sys

import psycopg

PATIENTS = {
    "acme": [("123-45-6789", "Alice Example", "1980-01-02", "120.50", '{"allergies": ["penicillin"]}')],
    "globex": [("987-65-4321", "Bob Sample", "1975-05-06", "-3.25", '{"allergies": []}')],
}


def main(proxy_dsn: str, direct_dsn: str) -> int:
    for tenant, rows in PATIENTS.items():
        # Each tenant's rows are sealed under that tenant's own data key.
        with psycopg.connect(proxy_dsn, options=f"-c pgseal.tenant={tenant}", autocommit=True) as conn:
            for ssn, name, dob, balance, profile in rows:
                conn.execute(
                    "INSERT INTO patients (tenant_id, ssn, name, dob, balance, profile) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, ssn) DO NOTHING",
                    [tenant, ssn, name, dob, balance, profile],
                )
    print("What the application sees (through pgseal, tenant acme):")
    with psycopg.connect(proxy_dsn, options="-c pgseal.tenant=acme") as conn:
        app_rows = conn.execute(
            "SELECT id, tenant_id, ssn, name, dob, balance FROM patients WHERE ssn = %s", ["123-45-6789"]
        ).fetchall()
    for row in app_rows:
        print("   ", row)
    print("\nWhat PostgreSQL stores (read directly, no proxy):")
    with psycopg.connect(direct_dsn) as conn:
        stored = conn.execute("SELECT id, tenant_id, ssn, name, dob, balance FROM patients ORDER BY id").fetchall()
    for row in stored:
        print("   ", tuple(v.hex()[:24] + "..." if isinstance(v, bytes) else v for v in row))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
