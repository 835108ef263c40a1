// BullMQ peer benchmark: N no-op jobs added in bulk, then processed with the given concurrency,
// on the Redis at REDIS_HOST:REDIS_PORT. Prints one JSON line. Run by bench/run.sh.
const { Queue, Worker } = require('bullmq');

const N = Number(process.env.N || 20000);
const CONCURRENCY = Number(process.env.CONCURRENCY || 50);
const connection = {
  host: process.env.REDIS_HOST || '127.0.0.1',
  port: Number(process.env.REDIS_PORT || 6379),
  maxRetriesPerRequest: null,
};
const name = `arnela-bench-${process.pid}-${Date.now()}`;

async function main() {
  const queue = new Queue(name, { connection });
  const jobs = Array.from({ length: N }, (_, i) => ({ name: 'noop', data: { i } }));
  const addStart = process.hrtime.bigint();
  for (let i = 0; i < N; i += 1000) {
    await queue.addBulk(jobs.slice(i, i + 1000));
  }
  const addSeconds = Number(process.hrtime.bigint() - addStart) / 1e9;

  let done = 0;
  const runStart = process.hrtime.bigint();
  let worker;
  await new Promise((resolve) => {
    worker = new Worker(name, async () => {}, { connection, concurrency: CONCURRENCY });
    worker.on('completed', () => {
      done += 1;
      if (done === N) resolve();
    });
  });
  const runSeconds = Number(process.hrtime.bigint() - runStart) / 1e9;
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  console.log(JSON.stringify({
    jobs: N,
    concurrency: CONCURRENCY,
    add_per_second: N / addSeconds,
    processed_per_second: N / runSeconds,
  }));
}

main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
