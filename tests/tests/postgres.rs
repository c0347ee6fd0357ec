//! `PostgreSQL` through agentgate, with a real server and real clients.

use agentgate_e2e::{DaemonOptions, Env, pg::PgServer, run_ok};

#[test]
fn psql_through_the_proxy_reaches_the_real_server() {
    let env = Env::new("pgl4", DaemonOptions::default()).unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    pg.seed_customers(10).unwrap();
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let out = run_ok(&mut env.exec(
        "demo",
        &[
            "/usr/lib/postgresql/15/bin/psql",
            &url,
            "-qAtc",
            "SELECT count(*) FROM customers",
        ],
    ))
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10");
    let s = env.status().unwrap();
    assert_eq!(s["counters"]["redirected"].as_u64(), Some(1));
}
