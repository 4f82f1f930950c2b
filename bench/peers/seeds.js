// The design the seeds describe (/work/shared/seeds: queue-system-bullmq.md, review-close-timers.md,
// race-conditions.md), measured on the same machine as Parley by `make bench-peers`.
//
//   "webhook" side  -> queue `message-receive` (jobId msg-recv-<session>-<wamid>, priority 7, 3 attempts)
//   receive worker  -> INSERT the message, UPSERT the conversation (close_job_id kept in the row),
//                      then reschedule the close job: getJob + remove + add(delay)   (concurrency 10)
//   close worker    -> queue `conversation-close` (jobId close-<conversation>), conditional UPDATE
//                      ... WHERE state <> 'closed' AND close_at <= now()            (concurrency 50)
//
// Departures, all stated in the README: queue names use '-' (BullMQ refuses ':' in queue names and
// job ids), the producer adds to the queue directly (no HTTP server in front), no outgoing webhook
// is enqueued after the message is stored, and the message table has no unique constraint on the
// event id, so that an event processed twice shows up as two rows.
//
// Usage: node seeds.js <phase> [--key value ...]; PEERS_REDIS_URL and PEERS_PG_URL (a DSN to a
// maintenance database; this script creates and drops its own database) come from the environment.
// Each phase prints one JSON object on the last line of stdout.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';
import pg from 'pg';

const SELF = fileURLToPath(import.meta.url);
const RECEIVE = 'message-receive';
const CLOSE = 'conversation-close';
const DB_NAME = 'bullmq_seeds';
const IDLE_MS = 180_000; // review-close-timers.md: `delay: 180000`

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const log = (...args) => console.error('[seeds]', ...args);

function args() {
  const out = {};
  const argv = process.argv.slice(3);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  return out;
}

function redis() {
  return new IORedis(process.env.PEERS_REDIS_URL, { maxRetriesPerRequest: null });
}

function dbUrl(name = DB_NAME) {
  const url = new URL(process.env.PEERS_PG_URL);
  url.pathname = `/${name}`;
  return url.toString();
}

function pool() {
  return new pg.Pool({ connectionString: dbUrl(), max: 20 }); // "Pool size = 20 por processo"
}

function pct(sorted, q) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round((q / 100) * sorted.length) - 1))];
}

function summary(values) {
  const sorted = Float64Array.from(values).sort();
  return { n: sorted.length, p50: pct(sorted, 50), p99: pct(sorted, 99), max: sorted.length ? sorted[sorted.length - 1] : null };
}

// Seeds' queueManager: attempts 3, exponential backoff, removeOnComplete {count: 50}.
function receiveQueue(connection) {
  return new Queue(RECEIVE, {
    connection,
    defaultJobOptions: {
      attempts: 3,
      backoff: { type: 'exponential', delay: 2000 },
      removeOnComplete: { count: 50 },
      removeOnFail: { count: 100_000 },
    },
  });
}

function closeQueue(connection) {
  return new Queue(CLOSE, {
    connection,
    defaultJobOptions: { attempts: 3, backoff: { type: 'exponential', delay: 2000 }, removeOnComplete: true, removeOnFail: false },
  });
}

// ---------------------------------------------------------------------------------------------
// Set-up: own database, own tables; Redis and tables emptied before each phase.

async function setup() {
  const admin = new pg.Client({ connectionString: process.env.PEERS_PG_URL });
  await admin.connect();
  await admin.query(`DROP DATABASE IF EXISTS ${DB_NAME}`);
  await admin.query(`CREATE DATABASE ${DB_NAME}`);
  await admin.end();
  const db = new pg.Client({ connectionString: dbUrl() });
  await db.connect();
  await db.query(`
    CREATE TABLE conversations (
      id text PRIMARY KEY,
      session_id text NOT NULL,
      contact text NOT NULL,
      state text NOT NULL DEFAULT 'open',
      message_count int NOT NULL DEFAULT 0,
      last_message_at timestamptz,
      close_at timestamptz,
      close_job_id text,
      closed_at timestamptz,
      updated_at timestamptz NOT NULL DEFAULT now()
    );
    -- No unique constraint on event_id: an event written twice is two rows, and is counted.
    CREATE TABLE messages (
      id bigserial PRIMARY KEY,
      event_id text NOT NULL,
      conversation_id text NOT NULL,
      direction text NOT NULL,
      body text,
      sent_at timestamptz NOT NULL,
      written_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE INDEX messages_event_id ON messages (event_id);
  `);
  await db.end();
  return { database: DB_NAME };
}

async function reset() {
  const r = redis();
  await r.flushall();
  await r.quit();
  const db = new pg.Client({ connectionString: dbUrl() });
  await db.connect();
  await db.query('TRUNCATE messages, conversations RESTART IDENTITY');
  await db.end();
}

async function dropDatabase() {
  const admin = new pg.Client({ connectionString: process.env.PEERS_PG_URL });
  await admin.connect();
  await admin.query(`DROP DATABASE IF EXISTS ${DB_NAME}`);
  await admin.end();
  return { dropped: DB_NAME };
}

// ---------------------------------------------------------------------------------------------
// The workers, each run as its own process (`node seeds.js receive-worker` / `close-worker`),
// as the seeds' `node src/workers/index.js` is separate from the API server.

async function receiveWorker() {
  const connection = redis();
  const db = pool();
  const closes = closeQueue(connection);
  const concurrency = Number(process.env.PEERS_RECEIVE_CONCURRENCY || 10); // seeds: concurrency 10

  async function processReceiveMessage(job) {
    const { sessionId, waMessageId, from, text, sentAt } = job.data;
    const conversationId = `${sessionId}-${from}`;
    const closeJobId = `close-${conversationId}`;
    // createMessage(...): the message row.
    await db.query(
      `INSERT INTO messages (event_id, conversation_id, direction, body, sent_at)
       VALUES ($1, $2, 'inbound', $3, to_timestamp($4::float8 / 1000))`,
      [waMessageId, conversationId, text, sentAt],
    );
    // The conversation: opened or touched, its close time and close job id kept in the row.
    await db.query(
      `INSERT INTO conversations (id, session_id, contact, state, message_count, last_message_at, close_at, close_job_id)
       VALUES ($1, $2, $3, 'open', 1, now(), now() + $4::int * interval '1 millisecond', $5)
       ON CONFLICT (id) DO UPDATE SET state = 'open', message_count = conversations.message_count + 1,
         last_message_at = now(), close_at = EXCLUDED.close_at, close_job_id = EXCLUDED.close_job_id, updated_at = now()`,
      [conversationId, sessionId, from, IDLE_MS, closeJobId],
    );
    // Reschedule the close job, as review-close-timers.md does it: getJob + remove, then add.
    const existing = await closes.getJob(closeJobId);
    if (existing) await existing.remove();
    await closes.add('close-conversation', { conversationId }, { jobId: closeJobId, delay: IDLE_MS });
    return { success: true };
  }

  const worker = new Worker(RECEIVE, processReceiveMessage, { connection, concurrency });
  worker.on('failed', (job, err) => {
    // Bench bookkeeping: failed attempts counted in Redis (completed jobs are not kept to count).
    connection.incr('peers:receive-failed-attempts').catch(() => {});
    if (job && job.attemptsMade <= 1) log(`receive job ${job.id} failed: ${err.message}`);
  });
  await worker.waitUntilReady();
  console.log('ready');
  const stop = async () => {
    await worker.close();
    await closes.close();
    await db.end();
    await connection.quit();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

async function closeWorker() {
  const expect = Number(process.env.PEERS_EXPECT || 0);
  const connection = redis();
  const db = pool();
  const lateness = [];
  const fireToRow = [];
  const runs = new Map();
  let early = 0;
  let closed = 0;
  let refused = 0; // fired, but the conditional UPDATE changed nothing

  async function processClose(job) {
    const due = job.timestamp + job.opts.delay;
    const late = job.processedOn - due;
    lateness.push(late);
    if (late < 0) early += 1;
    runs.set(job.id, (runs.get(job.id) || 0) + 1);
    // review-close-timers.md: conditional update, rowsAffected === 1 or someone else won.
    const res = await db.query(
      `UPDATE conversations SET state = 'closed', close_at = NULL, closed_at = now()
       WHERE id = $1 AND state <> 'closed' AND close_at <= now()`,
      [job.data.conversationId],
    );
    closed += res.rowCount;
    if (res.rowCount === 0) refused += 1;
    fireToRow.push(Date.now() - due);
  }

  const worker = new Worker(CLOSE, processClose, { connection, concurrency: 50 });
  await worker.waitUntilReady();
  console.log('ready');
  let reported = false;
  const report = async () => {
    if (reported) return;
    reported = true;
    await worker.close();
    let doubles = 0;
    for (const count of runs.values()) if (count > 1) doubles += count - 1;
    console.log(JSON.stringify({
      fired: runs.size, closed, refused, early, doubles,
      lateness_ms: summary(lateness), fire_to_row_ms: summary(fireToRow),
    }));
    await db.end();
    await connection.quit();
    process.exit(0);
  };
  process.on('SIGTERM', report);
  if (expect) {
    while (runs.size < expect) await sleep(200);
    await report();
  }
}

// A worker process, read until it says 'ready'; the JSON it prints last is its result.
function startWorker(role, env = {}) {
  const child = spawn(process.execPath, [SELF, role], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  process.on('exit', () => child.kill('SIGKILL')); // no worker outlives the phase that started it
  let out = '';
  const ready = new Promise((resolve, reject) => {
    child.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('ready')) resolve();
    });
    child.on('exit', (code) => reject(new Error(`${role} exited with ${code} before it was ready`)));
  });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const result = async () => {
    await exited;
    const lines = out.trim().split('\n');
    return JSON.parse(lines[lines.length - 1]);
  };
  return { child, ready, exited, result };
}

// ---------------------------------------------------------------------------------------------
// The producer ("webhook" side): enqueueReceiveMessage as the seeds write it.

function event(run, i, threads) {
  return {
    sessionId: `s${run}`,
    waMessageId: `wamid-${run}-${i}`,
    from: `55${i % threads}`,
    text: 'hello',
  };
}

function receiveJob(data) {
  return { name: 'receive-message', data, opts: { jobId: `msg-recv-${data.sessionId}-${data.waMessageId}`, priority: 7 } };
}

async function enqueueAll(queue, run, n, threads) {
  // Preloaded backlog (the worker is stopped): addBulk by 1,000, sentAt = when it was added.
  for (let i = 0; i < n; i += 1000) {
    const jobs = [];
    for (let j = i; j < Math.min(n, i + 1000); j++) jobs.push(receiveJob({ ...event(run, j, threads), sentAt: Date.now() }));
    await queue.addBulk(jobs);
  }
}

async function paced(queue, run, n, threads, rate, inFlight = 256) {
  // One queue.add per event, at `rate` per second, at most `inFlight` outstanding.
  const start = Date.now();
  let next = 0;
  let pending = 0;
  let done;
  const finished = new Promise((resolve) => { done = resolve; });
  return new Promise((resolve, reject) => {
    const tick = () => {
      const due = Math.min(n, Math.floor(((Date.now() - start) / 1000) * rate) + 1);
      while (next < due && pending < inFlight) {
        const data = { ...event(run, next, threads), sentAt: Date.now() };
        next += 1;
        pending += 1;
        queue.add('receive-message', data, receiveJob(data).opts).then(() => {
          pending -= 1;
          if (next >= n && pending === 0) done();
        }, reject);
      }
      if (next < n) setTimeout(tick, 2);
    };
    tick();
    finished.then(() => resolve((n / (Date.now() - start)) * 1000));
  });
}

async function rowsWritten(db, run) {
  const r = await db.query('SELECT count(*)::int AS n FROM messages WHERE event_id LIKE $1', [`wamid-${run}-%`]);
  return r.rows[0].n;
}

async function waitRows(db, run, n, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let have = 0;
  while ((have = await rowsWritten(db, run)) < n) {
    if (Date.now() > deadline) throw new Error(`only ${have} of ${n} rows after ${timeoutMs} ms`);
    await sleep(50);
  }
  return have;
}

// ---------------------------------------------------------------------------------------------
// Phase 1: inbound throughput (backlog drained by the worker, first row to last row, as Parley's
// worker phase) and add-to-row latency at offered rates (the webhook-to-row analogue).

async function inbound() {
  const a = args();
  const n = Number(a.events || 100_000);
  const threads = Number(a.threads || 2000);
  const rates = (a.rates || '200,1000').split(',').map(Number);
  const scale = Number(a.scale || 1);
  await reset();
  const connection = redis();
  const queue = receiveQueue(connection);
  const db = new pg.Client({ connectionString: dbUrl() });
  await db.connect();
  const out = { events: n, threads, concurrency: Number(process.env.PEERS_RECEIVE_CONCURRENCY || 10) };
  try {
    const run = 't';
    const t0 = Date.now();
    await enqueueAll(queue, run, n, threads);
    out.preload_s = (Date.now() - t0) / 1000;
    const worker = startWorker('receive-worker');
    await worker.ready;
    await waitRows(db, run, 1, 60_000);
    const start = Date.now();
    const first = await rowsWritten(db, run);
    await waitRows(db, run, n, 1_800_000);
    out.msg_per_s = (n - first) / ((Date.now() - start) / 1000);
    const counts = await queue.getJobCounts('failed', 'completed');
    out.failed_attempts = Number((await connection.get('peers:receive-failed-attempts')) || 0);
    out.failed_jobs = counts.failed;
    out.latency = {};
    for (const rate of rates) {
      const m = Math.max(100, Math.round(rate * 8 * scale));
      const r = `r${rate}`;
      const achieved = await paced(queue, r, m, threads, rate);
      await waitRows(db, r, m, 600_000);
      const lat = await db.query(
        `SELECT extract(epoch FROM written_at - sent_at) * 1000 AS ms FROM messages WHERE event_id LIKE $1`,
        [`wamid-${r}-%`],
      );
      out.latency[rate] = { events: m, achieved_per_s: achieved, ...summary(lat.rows.map((x) => Number(x.ms))) };
    }
    worker.child.kill('SIGTERM');
    await worker.exited;
  } finally {
    await db.end();
    await queue.close();
    await connection.quit();
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Phase 2 + 4: schedule N delayed jobs flat out (addBulk by 1,000), Redis memory per delayed job,
// then reschedules through the seeds' path (getJob + remove + add), 64 in flight.

async function schedule() {
  const a = args();
  const n = Number(a.jobs || 100_000);
  const m = Number(a.reschedules || 20_000);
  await reset();
  const connection = redis();
  const queue = closeQueue(connection);
  await queue.waitUntilReady();
  const out = { jobs: n, reschedules: m };
  try {
    const before = await usedMemory(connection);
    const t0 = Date.now();
    for (let i = 0; i < n; i += 1000) {
      const jobs = [];
      for (let j = i; j < Math.min(n, i + 1000); j++) {
        const conversationId = `s1-55${j}`;
        jobs.push({ name: 'close-conversation', data: { conversationId }, opts: { jobId: `close-${conversationId}`, delay: 3_600_000 } });
      }
      await queue.addBulk(jobs);
    }
    out.adds_per_s = n / ((Date.now() - t0) / 1000);
    const after = await usedMemory(connection);
    out.delayed = await queue.getDelayedCount();
    out.bytes_per_job = (after - before) / n;
    out.used_memory_mb = after / 1e6;

    let next = 0;
    const t1 = Date.now();
    const lanes = Array.from({ length: 64 }, async () => {
      while (next < m) {
        const conversationId = `s1-55${next++}`;
        const jobId = `close-${conversationId}`;
        const job = await queue.getJob(jobId);
        if (job) await job.remove();
        await queue.add('close-conversation', { conversationId }, { jobId, delay: IDLE_MS });
      }
    });
    await Promise.all(lanes);
    out.reschedules_per_s = m / ((Date.now() - t1) / 1000);
    out.delayed_after = await queue.getDelayedCount();
  } finally {
    await queue.close();
    await connection.quit();
  }
  return out;
}

// Where the close jobs of conversations still open are: { state: count } ('missing': no job).
async function jobStates(queue, db) {
  const open = await db.query(`SELECT close_job_id FROM conversations WHERE state <> 'closed'`);
  const states = {};
  for (const row of open.rows) {
    const job = await queue.getJob(row.close_job_id);
    const state = job ? await job.getState() : 'missing';
    states[state] = (states[state] || 0) + 1;
  }
  return states;
}

async function usedMemory(connection) {
  const info = await connection.info('memory');
  return Number(/used_memory:(\d+)/.exec(info)[1]);
}

// ---------------------------------------------------------------------------------------------
// Phase 3: N close jobs due within one minute, fired by the close worker (concurrency 50).
// With --kill_at f: the close worker is killed (-9) once f of them are closed, and restarted;
// closes lost (conversation still open) and the lateness of every close are read from Postgres.

async function firing() {
  const a = args();
  const n = Number(a.timers || 100_000);
  const spreadMs = Number(a.spread_ms || 60_000);
  const killAt = a.kill_at ? Number(a.kill_at) : null;
  await reset();
  const connection = redis();
  const queue = closeQueue(connection);
  await queue.waitUntilReady();
  const db = new pg.Client({ connectionString: dbUrl() });
  await db.connect();
  const out = { timers: n, spread_ms: spreadMs };
  try {
    const leadMs = Math.max(5_000, n / 5); // enough to add them all before the first is due
    const t0 = Date.now();
    const dues = Array.from({ length: n }, () => t0 + leadMs + Math.random() * spreadMs);
    const ids = Array.from({ length: n }, (_, i) => `s1-55${i}`);
    await db.query(
      `INSERT INTO conversations (id, session_id, contact, state, message_count, last_message_at, close_at, close_job_id)
       SELECT id, 's1', id, 'open', 1, now(), to_timestamp(due / 1000), 'close-' || id
       FROM unnest($1::text[], $2::float8[]) AS t(id, due)`,
      [ids, dues],
    );
    let worker = startWorker('close-worker', { PEERS_EXPECT: killAt ? '0' : String(n) });
    await worker.ready;
    const tAdd = Date.now();
    for (let i = 0; i < n; i += 1000) {
      const jobs = [];
      const now = Date.now();
      for (let j = i; j < Math.min(n, i + 1000); j++) {
        // Rounded up: BullMQ's due (timestamp + delay, whole ms) is never before the row's close_at,
        // or the conditional UPDATE would refuse a close fired on time.
        const delay = Math.max(0, Math.ceil(dues[j] - now));
        jobs.push({ name: 'close-conversation', data: { conversationId: ids[j] }, opts: { jobId: `close-${ids[j]}`, delay } });
      }
      await queue.addBulk(jobs);
    }
    out.added_s = (Date.now() - tAdd) / 1000;
    out.created_before_due = Date.now() < t0 + leadMs;
    const closedRows = async () => (await db.query(`SELECT count(*)::int AS n FROM conversations WHERE state = 'closed'`)).rows[0].n;
    if (killAt === null) {
      const timeout = setTimeout(() => worker.child.kill('SIGTERM'), leadMs + spreadMs + 120_000);
      Object.assign(out, await worker.result());
      clearTimeout(timeout);
    } else {
      while ((await closedRows()) < n * killAt) await sleep(20);
      worker.child.kill('SIGKILL');
      await worker.exited;
      const killedAt = Date.now();
      out.closed_at_kill = await closedRows();
      worker = startWorker('close-worker', { PEERS_EXPECT: '0' });
      await worker.ready;
      const deadline = t0 + leadMs + spreadMs + 150_000;
      while ((await closedRows()) < n && Date.now() < deadline) await sleep(100);
      out.recovered_s = (Date.now() - killedAt) / 1000;
      await sleep(2_000); // anything still to run a second time
      worker.child.kill('SIGTERM');
      const second = await worker.result();
      out.restarted_worker_fired = second.fired;
      out.refired = second.refused; // ran again after the kill, the row already closed: a no-op
      const rows = await db.query(`SELECT id, extract(epoch FROM closed_at) * 1000 AS at FROM conversations WHERE state = 'closed'`);
      const due = new Map(ids.map((id, i) => [id, dues[i]]));
      out.close_lateness_ms = summary(rows.rows.map((r) => Number(r.at) - due.get(r.id)));
      out.lost = n - rows.rows.length;
      out.lost_jobs = await jobStates(queue, db);
    }
    out.closed_rows = await closedRows();
    if (out.closed_rows < n) out.open_jobs = await jobStates(queue, db);
  } finally {
    await db.end();
    await queue.close();
    await connection.quit();
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Phase 5: kill -9 of the receive worker mid-run, restart it, count events lost or doubled.

async function crash() {
  const a = args();
  const n = Number(a.events || 20_000);
  const threads = Number(a.threads || 2000);
  const at = Number(a.kill_at || 0.4);
  await reset();
  const connection = redis();
  const queue = receiveQueue(connection);
  const closes = closeQueue(connection);
  const db = new pg.Client({ connectionString: dbUrl() });
  await db.connect();
  const out = { events: n, kill_at: at };
  try {
    const run = 'k';
    await enqueueAll(queue, run, n, threads);
    let worker = startWorker('receive-worker');
    await worker.ready;
    while ((await rowsWritten(db, run)) < n * at) await sleep(20);
    worker.child.kill('SIGKILL');
    await worker.exited;
    const killedAt = Date.now();
    out.rows_at_kill = await rowsWritten(db, run);
    worker = startWorker('receive-worker');
    await worker.ready;
    // Done when nothing is waiting, active, prioritized or delayed (retries) in the receive queue.
    const deadline = Date.now() + 300_000;
    for (;;) {
      const c = await queue.getJobCounts('waiting', 'active', 'prioritized', 'delayed', 'paused');
      if (Object.values(c).every((v) => v === 0)) break;
      if (Date.now() > deadline) { out.timed_out = c; break; }
      await sleep(100);
    }
    out.recovered_s = (Date.now() - killedAt) / 1000;
    worker.child.kill('SIGTERM');
    await worker.exited;
    const r = await db.query(
      `SELECT count(*) FILTER (WHERE c = 1)::int AS once, count(*) FILTER (WHERE c > 1)::int AS doubled,
              coalesce(sum(c - 1) FILTER (WHERE c > 1), 0)::int AS extra_rows
       FROM (SELECT event_id, count(*) AS c FROM messages WHERE event_id LIKE $1 GROUP BY event_id) t`,
      [`wamid-${run}-%`],
    );
    const { once, doubled, extra_rows: extraRows } = r.rows[0];
    out.written_once = once;
    out.doubled = doubled;
    out.extra_rows = extraRows;
    out.lost = n - once - doubled;
    out.failed_jobs = (await queue.getJobCounts('failed')).failed;
    // Conversations left without a pending close job (a timer lost with the kill).
    const convs = await db.query(`SELECT id, close_job_id FROM conversations WHERE state = 'open'`);
    let missing = 0;
    for (const row of convs.rows) {
      const job = await closes.getJob(row.close_job_id);
      if (!job || (await job.getState()) !== 'delayed') missing += 1;
    }
    out.conversations = convs.rows.length;
    out.close_jobs_missing = missing;
  } finally {
    await db.end();
    await queue.close();
    await closes.close();
    await connection.quit();
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

const phases = { setup, inbound, schedule, firing, crash, drop: dropDatabase };
const role = process.argv[2];
if (role === 'receive-worker') await receiveWorker();
else if (role === 'close-worker') await closeWorker();
else if (phases[role]) {
  const result = await phases[role]();
  console.log(JSON.stringify(result));
  process.exit(0);
} else {
  console.error(`usage: node seeds.js <${Object.keys(phases).join('|')}|receive-worker|close-worker> [--key value ...]`);
  process.exit(2);
}
