// Browser test of the Arnela operator console (ui/): drives Chromium through the pages with
// an admin token and an auditor token, takes screenshots, and checks the API's answers.
//
//   ARNELA_URL=http://127.0.0.1:8080 ADMIN_TOKEN=… AUDITOR_TOKEN=… SCREENSHOT_DIR=… \
//   SUCCEEDED_TASK_ID=… DEAD_TASK_ID=… BULK_TYPE=send_sms BULK_REASON=… BULK_COUNT=3 \
//   PAUSE_TYPE=send_whatsapp SCHEDULE_ID=… node console.mjs
//
// Exits 0 only when every step passed.

import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';

const REQUIRED = [
  'ARNELA_URL', 'ADMIN_TOKEN', 'AUDITOR_TOKEN', 'SUCCEEDED_TASK_ID', 'DEAD_TASK_ID',
  'BULK_TYPE', 'BULK_REASON', 'BULK_COUNT', 'PAUSE_TYPE', 'SCHEDULE_ID',
];
const missing = REQUIRED.filter((k) => !process.env[k]);
if (missing.length) {
  console.error(`missing environment variables: ${missing.join(', ')}`);
  process.exit(1);
}
const env = process.env;
const BASE = env.ARNELA_URL.replace(/\/+$/, '');
const SHOTS = path.resolve(env.SCREENSHOT_DIR || 'screenshots');
const BULK_COUNT = Number.parseInt(env.BULK_COUNT, 10);
if (!Number.isInteger(BULK_COUNT) || BULK_COUNT < 1) {
  console.error(`BULK_COUNT must be a positive integer, not ${JSON.stringify(env.BULK_COUNT)}`);
  process.exit(1);
}
const TIMEOUT = Number.parseInt(env.UI_TIMEOUT_MS || '15000', 10);

/** Every element carrying one of these data-testid prefixes is an action button. */
const ACTIONS = '[data-testid^="action-"]';

const tid = (id) => `[data-testid="${id}"]`;

let stepNo = 0;
async function step(name, fn) {
  stepNo += 1;
  const started = Date.now();
  console.log(`[${stepNo}] ${name}`);
  await fn();
  console.log(`[${stepNo}] ok (${Date.now() - started} ms)`);
}

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

function log(message) {
  console.log(`    ${message}`);
}

async function apiCall(method, urlPath, tokenValue, body) {
  const res = await fetch(`${BASE}${urlPath}`, {
    method,
    headers: {
      Authorization: `Bearer ${tokenValue}`,
      Accept: 'application/json',
      ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = { raw: text };
  }
  return { status: res.status, body: json };
}

async function shot(page, name, fullPage = true) {
  const file = path.join(SHOTS, name);
  await page.screenshot({ path: file, fullPage });
  log(`screenshot ${file}`);
}

async function signIn(page, tokenValue, role) {
  await page.locator(tid('signin-token')).waitFor({ state: 'visible' });
  await page.locator(tid('signin-token')).fill(tokenValue);
  await page.locator(tid('signin-submit')).click();
  await page.locator(tid('user-role')).filter({ hasText: new RegExp(`^${role}$`) }).waitFor({ state: 'visible' });
  const shownRole = (await page.locator(tid('user-role')).textContent())?.trim();
  check(shownRole === role, `header shows role ${role} (got ${JSON.stringify(shownRole)})`);
  log(`signed in as ${(await page.locator(tid('user-subject')).textContent())?.trim()} (${shownRole})`);
}

async function waitOverviewLoaded(page) {
  await page.locator(tid('overview-updated')).filter({ hasText: /Updated at \d/ }).waitFor();
  await page.locator(tid('types-table')).waitFor();
  await page.locator(tid('health-status')).waitFor();
}

async function openTimeline(page, id) {
  await page.goto(`${BASE}/ui#/tasks/${encodeURIComponent(id)}`);
  await page.locator(tid('task-id')).filter({ hasText: id }).waitFor();
  await page.locator(tid('chain-verdict')).waitFor();
}

async function openDeadLetters(page) {
  await page.locator(tid('nav-dead')).click();
  await page.locator(tid('dead-count')).waitFor();
}

async function countActions(page, where) {
  const n = await page.locator(ACTIONS).count();
  check(n === 0, `no action buttons for the auditor on ${where} (found ${n})`);
  const buttons = await page.locator('main button').evaluateAll((els) => els.map((e) => e.textContent.trim()));
  const forbidden = buttons.filter((t) => /^(pause|resume|retry|cancel|discard)/i.test(t));
  check(forbidden.length === 0, `no action-like buttons on ${where} (found ${JSON.stringify(forbidden)})`);
  log(`${where}: 0 action buttons`);
}

function isSubsequence(wanted, actual) {
  let i = 0;
  for (const a of actual) if (a === wanted[i]) i += 1;
  return i === wanted.length;
}

async function run(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(err.message));
  page.on('console', (msg) => {
    if (msg.type() === 'error') log(`browser console error: ${msg.text()}`);
  });

  await step('sign in with the admin token and load the overview', async () => {
    await page.goto(`${BASE}/ui`);
    await page.locator(tid('signin-token')).waitFor({ state: 'visible' });
    check(await page.locator('label[for="signin-token-input"]').count() === 1, 'the token field has a label');
    await shot(page, 'signin.png');
    await signIn(page, env.ADMIN_TOKEN, 'admin');
    await waitOverviewLoaded(page);
    check(await page.locator(`${tid('type-row-' + env.PAUSE_TYPE)}`).count() === 1, `overview has a row for ${env.PAUSE_TYPE}`);
    await shot(page, 'overview.png');
  });

  await step('tasks page: filter succeeded, find the task, check its timeline', async () => {
    await page.locator(tid('nav-tasks')).click();
    await page.locator(tid('tasks-filter-status')).selectOption('succeeded');
    await page.locator(tid('tasks-apply')).click();
    await page.locator(tid('tasks-count')).waitFor();
    const statuses = await page.locator(`${tid('task-row')} [data-status]`).evaluateAll((els) => els.map((e) => e.dataset.status));
    check(statuses.every((s) => s === 'succeeded'), `the filtered list holds succeeded tasks only (${[...new Set(statuses)]})`);
    log(`${statuses.length} succeeded task(s) on the first page`);
    await page.locator(tid('find-task-id')).fill(env.SUCCEEDED_TASK_ID);
    await shot(page, 'tasks.png');
    await page.locator(tid('find-task-submit')).click();
    await page.locator(tid('task-id')).filter({ hasText: env.SUCCEEDED_TASK_ID }).waitFor();
    await page.locator(tid('chain-verdict')).waitFor();
    const types = await page.locator(tid('event')).evaluateAll((els) => els.map((e) => e.dataset.eventType));
    log(`events: ${types.join(', ')}`);
    const wanted = ['enqueued', 'dispatched', 'attempt_started', 'attempt_succeeded'];
    check(isSubsequence(wanted, types), `events ${wanted.join(', ')} appear in order`);
    const verdict = (await page.locator(tid('chain-verdict')).textContent()).trim();
    check(/^Hash chain intact \(\d+ events\)$/.test(verdict), `verdict says intact (got ${JSON.stringify(verdict)})`);
    await shot(page, 'timeline.png');
  });

  await step('dead letters: retry one task with its row button', async () => {
    await openDeadLetters(page);
    await shot(page, 'dead-letters.png');
    const row = page.locator(`${tid('dead-row')}[data-task-id="${env.DEAD_TASK_ID}"]`);
    await row.waitFor();
    await row.locator(tid('action-dead-retry')).click();
    await page.locator(tid('row-result')).filter({ hasText: 'retried' }).waitFor();
    await page.reload();
    await page.locator(tid('dead-count')).waitFor();
    check(await row.count() === 0, 'the retried task left the dead list');
    const got = await apiCall('GET', `/tasks/${env.DEAD_TASK_ID}`, env.ADMIN_TOKEN);
    check(got.status === 200, `GET /tasks/{id} answers 200 (got ${got.status})`);
    check(got.body?.status !== 'dead', `the task is no longer dead (status ${got.body?.status})`);
    log(`task ${env.DEAD_TASK_ID} is now ${got.body.status}`);
  });

  await step('dead letters: bulk retry with preview and confirmation', async () => {
    await page.locator(tid('dead-filter-type')).selectOption(env.BULK_TYPE);
    await page.locator(tid('dead-filter-reason')).fill(env.BULK_REASON);
    await page.locator(tid('dead-apply')).click();
    await page.locator(tid('dead-count')).waitFor();
    const listed = await page.locator(tid('dead-row')).count();
    log(`${listed} matching dead letter(s) listed`);
    check(listed === BULK_COUNT, `the list shows ${BULK_COUNT} matching dead letters (got ${listed})`);
    await page.locator(tid('action-bulk-retry')).click();
    const dialog = page.locator(`dialog[open]${tid('confirm-dialog')}`);
    await dialog.waitFor();
    const message = (await page.locator(tid('confirm-message')).textContent()).trim();
    log(`dialog: ${message}`);
    check(new RegExp(`^${BULK_COUNT} dead letters? match`).test(message), `the dialog announces ${BULK_COUNT} matches`);
    await shot(page, 'bulk-confirm.png', false);
    await page.locator(tid('confirm-ok')).click();
    await dialog.waitFor({ state: 'hidden' });
    const result = page.locator(tid('bulk-result'));
    await result.waitFor();
    const text = (await result.textContent()).trim();
    log(`result: ${text}`);
    check(new RegExp(`^${BULK_COUNT} retried\\b`).test(text), `the result says ${BULK_COUNT} retried`);
  });

  await step(`overview: pause and resume ${env.PAUSE_TYPE}`, async () => {
    await page.locator(tid('nav-overview')).click();
    await waitOverviewLoaded(page);
    const stateCell = page.locator(tid(`type-state-${env.PAUSE_TYPE}`));
    await stateCell.and(page.locator('[data-paused]')).waitFor();
    check(await stateCell.getAttribute('data-paused') === 'false', `${env.PAUSE_TYPE} is not paused before the step`);
    await page.locator(tid(`action-pause-${env.PAUSE_TYPE}`)).click();
    await stateCell.and(page.locator('[data-paused="true"]')).waitFor();
    let types = await apiCall('GET', '/task-types', env.ADMIN_TOKEN);
    let entry = types.body?.types?.find((t) => t.type === env.PAUSE_TYPE);
    check(entry?.paused === true, `GET /task-types says ${env.PAUSE_TYPE} is paused`);
    await page.locator(tid(`action-resume-${env.PAUSE_TYPE}`)).waitFor();
    await shot(page, 'paused.png');
    await page.locator(tid(`action-resume-${env.PAUSE_TYPE}`)).click();
    await stateCell.and(page.locator('[data-paused="false"]')).waitFor();
    types = await apiCall('GET', '/task-types', env.ADMIN_TOKEN);
    entry = types.body?.types?.find((t) => t.type === env.PAUSE_TYPE);
    check(entry?.paused === false, `GET /task-types says ${env.PAUSE_TYPE} is no longer paused`);
  });

  await step('schedules: the list, one schedule\'s next runs and past slots, pause', async () => {
    await page.locator(tid('nav-schedules')).click();
    const row = page.locator(`${tid('schedule-row')}[data-schedule="${env.SCHEDULE_ID}"]`);
    await row.waitFor();
    await row.locator(tid('schedule-link')).click();
    await page.locator(tid('schedule-next-runs')).waitFor();
    const next = await page.locator(`${tid('schedule-next-runs')} li`).count();
    check(next === 5, `five next runs are shown (got ${next})`);
    // past slots appear as the schedule fires: reload until one is listed
    for (let i = 0; i < 30 && await page.locator(tid('schedule-run')).count() === 0; i += 1) {
      await page.waitForTimeout(500);
      await page.evaluate(() => window.dispatchEvent(new HashChangeEvent('hashchange')));
      await page.locator(tid('schedule-fields')).waitFor();
    }
    check(await page.locator(tid('schedule-run')).count() > 0, 'a past slot and its task are listed');
    check((await page.locator(tid('schedule-event')).first().getAttribute('data-event-type')) === 'created',
      'the change log starts with the creation');
    await shot(page, 'schedule.png');
    await page.locator(tid('action-schedule-pause')).click();
    await page.locator(tid('schedule-state')).filter({ hasText: 'paused' }).waitFor();
    const s = await apiCall('GET', `/schedules/${env.SCHEDULE_ID}`, env.ADMIN_TOKEN);
    check(s.body?.paused === true, 'GET /schedules/{id} says it is paused');
  });

  await step('auditor: signed in, sees no action anywhere, and the API refuses actions', async () => {
    await page.locator(tid('signout')).click();
    await page.locator(tid('signin-token')).waitFor({ state: 'visible' });
    check(await page.evaluate(() => sessionStorage.length) === 0, 'signing out clears the session storage');
    await signIn(page, env.AUDITOR_TOKEN, 'auditor');
    await waitOverviewLoaded(page);
    await countActions(page, 'overview');
    await openTimeline(page, env.SUCCEEDED_TASK_ID);
    await countActions(page, 'succeeded task timeline');
    await openTimeline(page, env.DEAD_TASK_ID);
    await countActions(page, 'retried task timeline');
    await shot(page, 'auditor-timeline.png');
    await openDeadLetters(page);
    await countActions(page, 'dead letters');
    await page.locator(tid('nav-schedules')).click();
    await page.locator(tid('schedule-row')).first().waitFor();
    await countActions(page, 'schedules');

    const attempts = [
      ['POST', `/tasks/${env.DEAD_TASK_ID}/retry`, undefined],
      ['POST', '/dead-letters/retry', { dry_run: false }],
      ['POST', `/task-types/${env.PAUSE_TYPE}/pause`, undefined],
      ['POST', `/schedules/${env.SCHEDULE_ID}/resume`, undefined],
    ];
    for (const [method, p, body] of attempts) {
      const res = await apiCall(method, p, env.AUDITOR_TOKEN, body);
      log(`${method} ${p} as auditor → ${res.status}`);
      check(res.status === 403, `${method} ${p} answers 403 to the auditor (got ${res.status})`);
    }
  });

  await step('phone-sized overview', async () => {
    const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
    try {
      const p = await phone.newPage();
      p.setDefaultTimeout(TIMEOUT);
      p.on('pageerror', (err) => pageErrors.push(err.message));
      await p.goto(`${BASE}/ui`);
      await signIn(p, env.ADMIN_TOKEN, 'admin');
      await waitOverviewLoaded(p);
      const overflow = await p.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
      check(overflow <= 1, `the page does not scroll sideways on a phone (overflow ${overflow}px)`);
      await shot(p, 'overview-phone.png');
    } finally {
      await phone.close();
    }
  });

  check(pageErrors.length === 0, `no uncaught errors in the page (${pageErrors.join(' | ')})`);
  await context.close();
}

let browser;
let failed = false;
try {
  await mkdir(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
    headless: true,
  });
  await run(browser);
  console.log('all console steps passed');
} catch (err) {
  failed = true;
  console.error(`FAILED at step ${stepNo}: ${err?.stack || err}`);
} finally {
  if (browser) await browser.close().catch(() => {});
}
process.exit(failed ? 1 : 0);
