#!/usr/bin/env python3
"""dlt's cursor run in the scale benchmark's harness (`BACKFLOW_BENCH_ONLY=cursor make bench`).

One run of a dlt pipeline that reads the benchmark's `customers` table with dlt's
`sql_database` source and an incremental cursor on `updated_at`
(`dlt.sources.incremental`: rows at or past the stored last value, ties at it
deduplicated by primary key), and pushes the rows to the benchmark's local sink through a
custom destination (`@dlt.destination`) in batches of 100, as the same JSON body that
Backflow's `http` destination sends: `{"operation":"upsert","records":[...]}`, each record
mapped as the Backflow sync of the benchmark maps it (lowercased email, a name from first
and last name, the rest under `properties`).

The pipeline's state (its last value) lives in `--pipelines-dir`, so successive runs with
the same directory read only what moved, as dlt's cursor runs do. It prints one JSON line:
the seconds of `pipeline.run` (imports and interpreter start excluded, as Backflow's own
figures exclude its process start), rows sent, requests, CPU seconds and peak RSS of the
process.

    make bench-dlt   # creates benches/dlt/.venv with requirements.txt
    benches/dlt/.venv/bin/python benches/dlt/cursor.py \\
        --database-url postgres://postgres@127.0.0.1:5432/DB --sink http://127.0.0.1:PORT \\
        --pipelines-dir /tmp/dlt-pipelines
"""
import argparse
import json
import os
import resource
import sys
import time


def sqlalchemy_url(url):
    """The benchmark's `postgres://` URL as SQLAlchemy names the psycopg2 driver."""
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--sink", required=True, help="base URL of the benchmark's sink")
    parser.add_argument("--pipelines-dir", required=True)
    parser.add_argument("--table", default="customers")
    parser.add_argument("--backend", default="pyarrow", help="sql_database backend")
    args = parser.parse_args()

    # dlt reads its settings from the environment too: no telemetry, no colour, quiet logs.
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")

    import dlt
    import requests
    from dlt.common import json as dlt_json
    from dlt.sources.sql_database import sql_table

    session = requests.Session()
    upsert = args.sink.rstrip("/") + "/upsert"
    sent = {"rows": 0, "requests": 0}

    def record(row):
        return {
            "id": row["id"],
            "email": row["email"].lower() if row["email"] is not None else None,
            "properties": {
                "name": f"{row['first_name']} {row['last_name']}",
                "plan": row["plan"],
                "mrr": row["mrr"],
                "signed_up_at": row["signed_up_at"],
                "active": row["is_active"],
                "score": row["score"],
            },
        }

    @dlt.destination(
        batch_size=100,
        name="bench_sink",
        naming_convention="direct",
        skip_dlt_columns_and_tables=True,
        max_table_nesting=0,
    )
    def sink(items, table):
        # Arrow backends hand over Arrow record batches (parquet load files), others dicts.
        if hasattr(items, "to_pylist"):
            items = items.to_pylist()
        body = dlt_json.dumps({"operation": "upsert", "records": [record(r) for r in items]})
        response = session.post(upsert, data=body, headers={"content-type": "application/json"})
        response.raise_for_status()
        sent["rows"] += len(items)
        sent["requests"] += 1

    table = sql_table(
        credentials=sqlalchemy_url(args.database_url),
        table=args.table,
        incremental=dlt.sources.incremental("updated_at"),
        primary_key="id",
        backend=args.backend,
    )
    pipeline = dlt.pipeline(
        pipeline_name="backflow_bench_cursor",
        pipelines_dir=args.pipelines_dir,
        destination=sink,
        dataset_name="bench",
        progress=None,
    )
    started = time.perf_counter()
    pipeline.run(table)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rows": sent["rows"],
                "requests": sent["requests"],
                "cpu_seconds": usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime,
                # ru_maxrss is in KiB on Linux.
                "peak_rss_mib": max(usage.ru_maxrss, children.ru_maxrss) / 1024.0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
