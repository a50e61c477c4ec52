"""PostgreSQL adapters (psycopg 3): pool, embedded server, migrations, named queries, repositories."""
