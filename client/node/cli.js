#!/usr/bin/env node
'use strict';
/**
 * imago-node: caption, ask, generate and health against an imago server.
 *
 * Exit codes: 0 success; 1 a gRPC error (printed as `error: CODE: details`,
 * then one line per field the server named) or a health status other than
 * SERVING; 2 bad usage or a local file that cannot be read or written.
 */

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const {
  DEFAULT_TARGET,
  ImagoClient,
  fieldViolations,
  retryDelaySeconds,
  statusName,
} = require('./imago');

const USAGE = `usage: imago-node [--target HOST:PORT] [--timeout SECONDS] [--tls] [--tls-ca PEM]
                  [--tls-cert PEM --tls-key PEM] [--token-file FILE] COMMAND ...

commands:
  caption IMAGE [--prefix TEXT] [--adapter NAME] [--num-beams N] [--max-new-tokens N]
      print a caption of IMAGE (PNG, JPEG or WebP), with the caption adapter NAME
  ask IMAGE QUESTION [--adapter NAME] [--num-beams N] [--max-new-tokens N]
      print the answer to QUESTION about IMAGE
  generate PROMPT --out FILE [--steps N] [--seed S] [--width W --height H]
           [--negative TEXT] [--guidance SCALE] [--scheduler NAME]
           [--previews-dir DIR [--preview-every N]]
      save the image to FILE (.png, .jpg or .webp) and print FILE and its seed;
      progress goes to stderr, previews to DIR/step-0001.jpg, ...
  health [SERVICE]
      print the health of the server, or of SERVICE (e.g. imago.v1.ImageGenService)

--target defaults to $IMAGO_TARGET, else ${DEFAULT_TARGET}; --timeout bounds each call.`;

const GLOBAL_OPTIONS = {
  target: { type: 'string' },
  timeout: { type: 'string' },
  tls: { type: 'boolean' },
  'tls-ca': { type: 'string' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  'token-file': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
};

const TEXT_OPTIONS = {
  adapter: { type: 'string' },
  'num-beams': { type: 'string' },
  'max-new-tokens': { type: 'string' },
};

const COMMANDS = {
  caption: { positionals: ['IMAGE'], options: { prefix: { type: 'string' }, ...TEXT_OPTIONS } },
  ask: { positionals: ['IMAGE', 'QUESTION'], options: TEXT_OPTIONS },
  generate: {
    positionals: ['PROMPT'],
    options: {
      out: { type: 'string', short: 'o' },
      steps: { type: 'string' },
      seed: { type: 'string' },
      width: { type: 'string' },
      height: { type: 'string' },
      negative: { type: 'string' },
      guidance: { type: 'string' },
      scheduler: { type: 'string' },
      'previews-dir': { type: 'string' },
      'preview-every': { type: 'string' },
    },
  },
  health: { positionals: [], optional: ['SERVICE'], options: {} },
};

const SUFFIX_FORMATS = { '.png': 'png', '.jpg': 'jpeg', '.jpeg': 'jpeg', '.webp': 'webp' };
const MIME_SUFFIXES = { 'image/png': '.png', 'image/jpeg': '.jpg', 'image/webp': '.webp' };

/** Bad command line: exit status 2. */
class UsageError extends Error {}

/** A local file that cannot be read or written: exit status 2. */
class LocalFileError extends Error {}

// ------------------------------------------------------------------ arguments

/** The command, its positionals and options from argv (without node and script). */
function parseCommandLine(argv) {
  const allOptions = { ...GLOBAL_OPTIONS };
  for (const command of Object.values(COMMANDS)) Object.assign(allOptions, command.options);
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: allOptions, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError(err.message);
  }
  const { values, positionals } = parsed;
  if (values.help) return { help: true };
  const [name, ...rest] = positionals;
  const command = COMMANDS[name];
  if (command === undefined) {
    throw new UsageError(name === undefined ? 'a command is needed' : `unknown command ${name}`);
  }
  for (const option of Object.keys(values)) {
    if (!(option in GLOBAL_OPTIONS) && !(option in command.options)) {
      throw new UsageError(`${name} takes no --${option}`);
    }
  }
  const most = command.positionals.length + (command.optional ?? []).length;
  if (rest.length < command.positionals.length || rest.length > most) {
    const expected = [...command.positionals, ...(command.optional ?? []).map((p) => `[${p}]`)];
    throw new UsageError(`${name} takes ${expected.join(' ') || 'no arguments'}`);
  }
  return { name, args: rest, values };
}

/** A non-negative integer option ("--steps 4"), or undefined when not given. */
function uintOption(values, name) {
  const text = values[name];
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text) || Number(text) > 0xffffffff) {
    const quoted = JSON.stringify(text);
    throw new UsageError(`--${name} takes a whole number 0..4294967295, not ${quoted}`);
  }
  return Number(text);
}

/** A number option ("--guidance 7.5"), or undefined when not given. */
function numberOption(values, name) {
  const text = values[name];
  if (text === undefined) return undefined;
  const value = Number(text);
  if (text.trim() === '' || !Number.isFinite(value)) {
    throw new UsageError(`--${name} takes a number, not ${JSON.stringify(text)}`);
  }
  return value;
}

/** A seed option: a decimal string in 0..2^64-1, or undefined. */
function seedOption(values) {
  const text = values.seed;
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text) || BigInt(text) > 2n ** 64n - 1n) {
    throw new UsageError(`--seed takes a whole number 0..2^64-1, not ${JSON.stringify(text)}`);
  }
  return text;
}

// ------------------------------------------------------------------ local files

function readLocal(file) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    const reason = err.code === 'ENOENT' ? 'no such file' : err.message;
    throw new LocalFileError(`cannot read ${file}: ${reason}`);
  }
}

function writeLocal(file, data) {
  try {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, data);
  } catch (err) {
    throw new LocalFileError(`cannot write ${file}: ${err.message}`);
  }
}

function makeDirectory(dir) {
  try {
    fs.mkdirSync(dir, { recursive: true });
  } catch (err) {
    throw new LocalFileError(`cannot create ${dir}: ${err.message}`);
  }
}

function readToken(file) {
  const token = readLocal(file).toString('latin1').trim();
  if (!/^[\x20-\x7e]+$/.test(token)) {
    throw new LocalFileError(`token file ${file} must hold one line of printable ASCII`);
  }
  return token;
}

/** An ImagoClient for the global options. */
function clientFromOptions(values) {
  if ((values['tls-cert'] === undefined) !== (values['tls-key'] === undefined)) {
    throw new UsageError('--tls-cert and --tls-key go together');
  }
  const options = { tls: Boolean(values.tls) };
  const timeout = numberOption(values, 'timeout');
  if (timeout !== undefined) {
    if (!(timeout > 0)) throw new UsageError('--timeout takes a positive number of seconds');
    options.deadline = timeout;
  }
  if (values['tls-ca'] !== undefined) options.rootCertificates = readLocal(values['tls-ca']);
  if (values['tls-cert'] !== undefined) {
    options.clientCertificateChain = readLocal(values['tls-cert']);
    options.clientPrivateKey = readLocal(values['tls-key']);
  }
  if (values['token-file'] !== undefined) options.token = readToken(values['token-file']);
  const target = values.target ?? (process.env.IMAGO_TARGET || DEFAULT_TARGET);
  return new ImagoClient(target, options);
}

// ------------------------------------------------------------------ commands

function textSettings(values) {
  return {
    ...(values.adapter !== undefined && { adapter: values.adapter }),
    numBeams: uintOption(values, 'num-beams'),
    maxNewTokens: uintOption(values, 'max-new-tokens'),
  };
}

async function runCaption(client, [image], values) {
  const data = readLocal(image);
  const options = { prefix: values.prefix ?? '', ...textSettings(values) };
  const reply = await client.caption(data, options);
  console.log(reply.captions.length > 0 ? reply.captions[0].text : '');
  return 0;
}

async function runAsk(client, [image, question], values) {
  const data = readLocal(image);
  const reply = await client.ask(data, question, textSettings(values));
  console.log(reply.answers.length > 0 ? reply.answers[0].text : '');
  return 0;
}

/** File name of a preview: step-0005.jpg (the suffix from its MIME type). */
function previewName(step, mimeType) {
  return `step-${String(step).padStart(4, '0')}${MIME_SUFFIXES[mimeType] ?? '.jpg'}`;
}

/** The onEvent of a generation: progress to stderr, previews into previewsDir. */
function eventReporter(previewsDir) {
  return (event) => {
    if (event.event === 'queued') {
      process.stderr.write(`queued at position ${event.queued.position}\n`);
    } else if (event.event === 'progress') {
      process.stderr.write(`step ${event.progress.step}/${event.progress.total_steps}\n`);
    } else if (event.event === 'preview' && previewsDir !== undefined) {
      const { step, image } = event.preview;
      writeLocal(path.join(previewsDir, previewName(step, image.mime_type)), image.data);
    }
  };
}

function generateOptions(values) {
  const previewsDir = values['previews-dir'];
  const previewEvery = uintOption(values, 'preview-every');
  if (previewEvery !== undefined && previewsDir === undefined) {
    throw new UsageError('--preview-every needs --previews-dir DIR');
  }
  return {
    negativePrompt: values.negative ?? '',
    width: uintOption(values, 'width') ?? 0,
    height: uintOption(values, 'height') ?? 0,
    steps: uintOption(values, 'steps') ?? 0,
    guidanceScale: numberOption(values, 'guidance'),
    seed: seedOption(values),
    scheduler: values.scheduler ?? '',
    outputFormat: SUFFIX_FORMATS[path.extname(values.out).toLowerCase()] ?? 'png',
    previewEvery: previewsDir === undefined ? 0 : (previewEvery ?? 1),
  };
}

async function runGenerate(client, [prompt], values) {
  if (values.out === undefined) throw new UsageError('generate needs --out FILE');
  const options = generateOptions(values);
  const previewsDir = values['previews-dir'];
  if (previewsDir !== undefined) makeDirectory(previewsDir);
  const result = await client.generate(prompt, options, eventReporter(previewsDir));
  for (const warning of result.warnings) process.stderr.write(`warning: ${warning}\n`);
  const [first] = result.images;
  writeLocal(values.out, first.image.data);
  console.log(`${values.out}\tseed=${first.seed}`);
  return 0;
}

async function runHealth(client, [service = '']) {
  const status = await client.health(service);
  console.log(status);
  return status === 'SERVING' ? 0 : 1;
}

const RUNNERS = { caption: runCaption, ask: runAsk, generate: runGenerate, health: runHealth };

// ------------------------------------------------------------------ errors

/** `error: CODE: details`, then the field violations and retry delay the server sent. */
function formatRpcError(err, target) {
  const name = statusName(err.code);
  const unreachable = /No connection established|ECONNREFUSED|Name resolution failed/i;
  if (name === 'UNAVAILABLE' && unreachable.test(err.details)) {
    return `error: UNAVAILABLE: cannot reach an imago server at ${target} (${err.details})`;
  }
  const lines = [err.details ? `error: ${name}: ${err.details}` : `error: ${name}`];
  for (const { field, description } of fieldViolations(err)) {
    lines.push(`  ${field}: ${description}`);
  }
  const delay = retryDelaySeconds(err);
  if (delay !== null) lines.push(`  retry after ${delay}s`);
  return lines.join('\n');
}

function isRpcError(err) {
  return err instanceof Error && typeof err.code === 'number' && 'details' in err;
}

/**
 * Runs the command line on argv (without node and the script) and resolves
 * with the exit status.
 * @param {string[]} argv
 * @returns {Promise<number>}
 */
async function main(argv) {
  let client;
  try {
    const parsed = parseCommandLine(argv);
    if (parsed.help) {
      console.log(USAGE);
      return 0;
    }
    client = clientFromOptions(parsed.values);
    return await RUNNERS[parsed.name](client, parsed.args, parsed.values);
  } catch (err) {
    if (isRpcError(err)) {
      process.stderr.write(`${formatRpcError(err, client.target)}\n`);
      return 1;
    }
    if (err instanceof UsageError) {
      process.stderr.write(`error: ${err.message}\n${USAGE}\n`);
      return 2;
    }
    if (err instanceof LocalFileError || err instanceof RangeError || err instanceof TypeError) {
      process.stderr.write(`error: ${err.message}\n`);
      return 2;
    }
    throw err;
  } finally {
    if (client !== undefined) client.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

module.exports = { main };
