//! The demo's second act: a policy change while traffic flows. `sleep` streams messages to `echo`
//! (one every 100 ms, each echoed back); the demo adds an AuthorizationPolicy DENY sleep → echo
//! where the mesh's source reads it and measures how long until ztund closes the running
//! connection ("connection closed by policy"), then checks that a new connection is refused.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::DemoError;
use super::scenario::{self, ECHO, SLEEP};
use super::traffic::{self, Client, Expect, Flow};
use super::world::World;

/// How often the streaming client sends a message.
const INTERVAL: Duration = Duration::from_millis(100);
/// How long the change may take to close the connection.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);
/// Messages echoed before the policy is changed, showing the flow runs.
const WARM_UP: usize = 3;

/// What the act showed.
#[derive(Debug)]
pub struct Outcome {
    /// From writing the policy to the client seeing its connection closed; `None`: not closed.
    pub closed_after: Option<Duration>,
    /// Messages echoed on the connection before it was closed.
    pub echoed: usize,
    /// Whether ztund said it closed the connection because of the new policy.
    pub closed_by_policy: bool,
    /// What a new connection ended in (a table row's result).
    pub new_connection: String,
    pub as_expected: bool,
}

/// Runs the act and says it in two lines.
pub async fn run(world: &World) -> Result<(Outcome, String), DemoError> {
    let target = ECHO
        .addr(&world.topology, world.ipv6)
        .ok_or_else(|| DemoError::Setup("the echo pod has no port to stream to".into()))?;
    let connect = world.connect(SLEEP.place(), target);
    let mut stream = tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .map_err(|_| DemoError::Setup(format!("sleep → {target}: connect timed out")))?
        .map_err(|e| DemoError::Setup(format!("sleep → {target}: {e}")))?;
    let marks = traffic::LogMarks::take(world);
    let message = b"tick from sleep\n";
    let mut interval = tokio::time::interval(INTERVAL);
    let mut back = vec![0u8; 4096];
    let mut received = 0usize;
    let mut changed: Option<Instant> = None;
    let mut closed_after = None;
    let mut where_written = String::new();
    let started = Instant::now();
    loop {
        if changed.is_none() && started.elapsed() > CLOSE_DEADLINE {
            break;
        }
        if changed.is_none() && received / message.len() >= WARM_UP {
            let path = world.write_policy(scenario::ECHO_DENY, &scenario::echo_deny_yaml())?;
            where_written = path
                .strip_prefix(world.dir.path())
                .unwrap_or(&path)
                .display()
                .to_string();
            changed = Some(Instant::now());
        }
        if let Some(at) = changed
            && at.elapsed() > CLOSE_DEADLINE
        {
            break;
        }
        tokio::select! {
            _ = interval.tick() => {
                if stream.write_all(message).await.is_err() {
                    closed_after = changed.map(|at| at.elapsed());
                    break;
                }
            }
            read = stream.read(&mut back) => match read {
                Ok(n) if n > 0 => received += n,
                _ => {
                    closed_after = changed.map(|at| at.elapsed());
                    break;
                }
            }
        }
    }
    let closed_line = traffic::wait_for_line(world, &marks, ECHO.node, |line| {
        line["message"] == "connection closed by policy"
    })
    .await;
    let closed_by_policy = closed_line
        .as_ref()
        .and_then(|l| l["reason"].as_str())
        .is_some_and(|reason| reason.contains(scenario::ECHO_DENY));
    let flow = Flow {
        client: Client::Pod(SLEEP),
        server: ECHO,
        target,
        target_label: format!("echo:{}", target.port()),
        expect: Expect::RefusedBy(scenario::ECHO_DENY),
    };
    let row = traffic::run(world, &flow).await;
    let outcome = Outcome {
        closed_after,
        echoed: received / message.len(),
        closed_by_policy,
        as_expected: closed_after.is_some() && closed_by_policy && row.as_expected,
        new_connection: row.result,
    };
    let closed = match (outcome.closed_after, outcome.closed_by_policy) {
        (Some(after), true) => format!(
            "sleep → echo closed by policy after {:.1} s",
            after.as_secs_f32()
        ),
        (Some(after), false) => format!(
            "sleep → echo closed after {:.1} s, but not by the policy",
            after.as_secs_f32()
        ),
        (None, _) => format!(
            "sleep → echo still open after {} s",
            CLOSE_DEADLINE.as_secs()
        ),
    };
    let mark = if outcome.as_expected { "  " } else { "! " };
    let text = format!(
        "  while sleep → echo streamed ({} messages echoed), AuthorizationPolicy {} (DENY sleep → echo) went to {where_written}\n\
         {mark}policy pushed by the control plane: {closed}; a new connection: {}\n",
        outcome.echoed,
        scenario::ECHO_DENY,
        outcome.new_connection,
    );
    Ok((outcome, text))
}
