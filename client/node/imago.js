'use strict';
/**
 * Node.js client for an imago server: captions, visual question answering,
 * streamed image generation and health checks over gRPC.
 *
 * The .proto files are loaded at run time from the repository's protos/
 * directory (and client/node/protos/ for grpc.health.v1 and the google.rpc
 * error details), so there is no generated code. Messages are plain objects
 * whose field names are the proto's own (snake_case, as in the Python client
 * and grpcurl), uint64 values (seeds) are decimal strings and enum values
 * are their names.
 *
 *     const { ImagoClient } = require('./imago');
 *     const client = new ImagoClient('127.0.0.1:50051', { deadline: 60 });
 *     const reply = await client.caption(fs.readFileSync('cat.png'), { numBeams: 3 });
 *     console.log(reply.captions[0].text);
 *     client.close();
 *
 * Failed calls reject with the grpc-js error (`code`, `details`,
 * `metadata`); `statusName` and `fieldViolations` read it.
 *
 * This module holds the credentials and ImagoClient; protos.js loads the
 * .proto files, messages.js builds the requests and errors.js reads failed
 * calls' statuses. Everything they offer callers is re-exported here.
 */

const grpc = require('@grpc/grpc-js');
const { services } = require('./protos');
const {
  GENERATION_FIELDS,
  askRequest,
  captionRequest,
  checkKnown,
  generateRequest,
  mimeType,
  number,
  uint64,
} = require('./messages');
const { fieldViolations, retryDelaySeconds, statusName } = require('./errors');

/** Where the client connects unless told otherwise. */
const DEFAULT_TARGET = '127.0.0.1:50051';
/** Largest message either way, in bytes: the server's default limit (64 MiB). */
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

// ------------------------------------------------------------------ client

function checkToken(token) {
  const printable = typeof token === 'string' && /^[\x20-\x7e]+$/.test(token);
  if (!printable || token !== token.trim()) {
    throw new TypeError('token must be non-empty printable ASCII without surrounding spaces');
  }
}

function channelCredentials(options) {
  const { rootCertificates, clientCertificateChain, clientPrivateKey, token } = options;
  if ((clientCertificateChain === undefined) !== (clientPrivateKey === undefined)) {
    throw new TypeError('clientCertificateChain and clientPrivateKey go together');
  }
  const tls = Boolean(options.tls) || rootCertificates !== undefined
    || clientCertificateChain !== undefined || options.serverNameOverride !== undefined;
  if (!tls) return null;
  const ssl = grpc.credentials.createSsl(
    rootCertificates ?? null,
    clientPrivateKey ?? null,
    clientCertificateChain ?? null,
  );
  if (token === undefined) return ssl;
  const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    const metadata = new grpc.Metadata();
    metadata.add('authorization', `Bearer ${token}`);
    callback(null, metadata);
  });
  return grpc.credentials.combineChannelCredentials(ssl, bearer);
}

/**
 * A client over one gRPC channel to an imago server.
 *
 * Methods return promises that reject with the grpc-js error of a failed
 * call (`err.code`, `err.details`; see {@link statusName} and
 * {@link fieldViolations}). Argument errors throw TypeError or RangeError
 * before anything is sent; ranges not checked here (README tables) are
 * checked by the server, which names the field.
 */
class ImagoClient {
  /**
   * @param {string} [target] "host:port" of the server (default 127.0.0.1:50051).
   * @param {object} [options]
   * @param {number} [options.deadline] seconds each call may take, a whole
   *   generation stream included; default: no deadline.
   * @param {boolean} [options.tls] connect with TLS, trusting the system's CAs
   *   unless rootCertificates is given (implied by any certificate option).
   * @param {Buffer} [options.rootCertificates] PEM of the CAs to trust.
   * @param {Buffer} [options.clientCertificateChain] PEM of the client's
   *   certificate, for servers that require mutual TLS (with clientPrivateKey).
   * @param {Buffer} [options.clientPrivateKey] PEM of its private key.
   * @param {string} [options.serverNameOverride] name the server's certificate
   *   must carry when it is not the target's host.
   * @param {string} [options.token] bearer token, sent as
   *   `authorization: Bearer TOKEN` on every call: as call credentials with
   *   TLS, as plain metadata (in the clear) without.
   * @param {number} [options.maxMessageBytes] cap on messages both ways
   *   (default 64 MiB, the server's default).
   */
  constructor(target = DEFAULT_TARGET, options = {}) {
    checkKnown(options, [
      'deadline', 'tls', 'rootCertificates', 'clientCertificateChain', 'clientPrivateKey',
      'serverNameOverride', 'token', 'maxMessageBytes',
    ], 'client option(s)');
    if (options.token !== undefined) checkToken(options.token);
    if (options.deadline !== undefined && !(number(options.deadline, 'deadline') > 0)) {
      const { deadline } = options;
      throw new RangeError(`deadline must be a positive number of seconds, got ${deadline}`);
    }
    this.target = target;
    this.deadline = options.deadline;
    const credentials = channelCredentials(options);
    this._plaintextToken = credentials === null ? options.token : undefined;
    const maxBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    const channelOptions = {
      'grpc.max_send_message_length': maxBytes,
      'grpc.max_receive_message_length': maxBytes,
    };
    if (options.serverNameOverride !== undefined) {
      channelOptions['grpc.ssl_target_name_override'] = options.serverNameOverride;
      channelOptions['grpc.default_authority'] = options.serverNameOverride;
    }
    const channelCreds = credentials ?? grpc.credentials.createInsecure();
    this._channel = new grpc.Channel(target, channelCreds, channelOptions);
    const stub = (Service) => new Service(target, channelCreds, { channelOverride: this._channel });
    this._caption = stub(services.imago.v1.CaptionService);
    this._vqa = stub(services.imago.v1.VqaService);
    this._imagegen = stub(services.imago.v1.ImageGenService);
    this._health = stub(services.grpc.health.v1.Health);
  }

  /** Closes the channel; calls in flight are cancelled. */
  close() {
    this._channel.close();
  }

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this._plaintextToken !== undefined) {
      metadata.add('authorization', `Bearer ${this._plaintextToken}`);
    }
    return metadata;
  }

  _callOptions() {
    if (this.deadline === undefined) return {};
    return { deadline: new Date(Date.now() + this.deadline * 1000) };
  }

  _unary(stub, method, request) {
    return new Promise((resolve, reject) => {
      stub[method](request, this._metadata(), this._callOptions(), (err, reply) => {
        if (err) reject(err);
        else resolve(reply);
      });
    });
  }

  /**
   * Captions one image.
   * @param {Buffer|Uint8Array} image encoded PNG, JPEG or WebP bytes (up to
   *   40 megapixels).
   * @param {object} [options] `prefix` (text the caption starts with),
   *   `adapter` (a caption adapter the server loaded; empty: the base model) and
   *   generation settings, each optional: maxNewTokens 1..256 (30),
   *   minNewTokens 0..maxNewTokens, numBeams 1..16 (1), doSample (false),
   *   temperature (0, 10], topP (0, 1], topK 0..1000 (50), repetitionPenalty
   *   (0, 10], numReturnSequences 1..16, lengthPenalty [-10, 10], seed
   *   0..2^64-1 (number, bigint or decimal string).
   * @returns {Promise<object>} the CaptionResponse: `captions` [{text, score}],
   *   `info`, and `seed` (a decimal string) when sampling.
   */
  caption(image, options = {}) {
    return this._unary(this._caption, 'Caption', captionRequest(image, options));
  }

  /**
   * Answers a question about one image; the model sees
   * "Question: {question} Answer:".
   * @param {Buffer|Uint8Array} image encoded PNG, JPEG or WebP bytes.
   * @param {string} question non-empty.
   * @param {object} [options] `adapter` and generation settings as for
   *   {@link ImagoClient#caption}.
   * @returns {Promise<object>} the AskResponse: `answers` [{text, score}], `info`, `seed`.
   */
  ask(image, question, options = {}) {
    return this._unary(this._vqa, 'Ask', askRequest(image, question, options));
  }

  /**
   * Generates images from a prompt, streaming the generation's events.
   *
   * @param {string} prompt what to draw, non-empty.
   * @param {object} [options] each optional; 0 or unset takes the server's default:
   *   negativePrompt; width, height in pixels (multiples of 8 in 64..2048; 0:
   *   the model's native size); steps 1..150 (30); guidanceScale [0, 30]
   *   (7.5); seed 0..2^64-1 (number, bigint or decimal string; image i uses
   *   seed + i; unset: random, reported with each image); numImages 1..8 (1);
   *   outputFormat "png" | "jpeg" | "webp" ("png"); outputQuality 1..100 for
   *   JPEG and WebP (95); omitParameters (keep the parameters text chunk out
   *   of PNGs); scheduler ("euler", "dpmpp_2m", ...; "": the model's own);
   *   loras {name: weight in [-4, 4]}; previewEvery N steps (0: no previews);
   *   previewFormat ("jpeg"); previewMaxSize in pixels (0: up to 512);
   *   previewMethod "latent_rgb" | "taesd" | "full"; previewAllImages;
   *   initImage (bytes: image-to-image) with strength (0, 1] (0.8);
   *   maskImage (bytes, white = repaint: inpainting, needs initImage);
   *   styleImage with styleScale (0, 2] (needs an IP-Adapter on the server);
   *   signal, an AbortSignal that cancels the generation.
   * @param {(event: object) => void} [onEvent] called with every
   *   GenerateResponse as it arrives, in order: `event` names the one set of
   *   `queued` {position}, `started` {worker, total_steps}, `progress`
   *   {step, total_steps, elapsed_seconds} (every step, step 1-based),
   *   `preview` {step, image_index, image} (every previewEvery steps) and
   *   `result`. If it throws, the generation is cancelled and the promise
   *   rejects with that error.
   * @returns {Promise<object>} the Result: `images` [{image: {data, mime_type,
   *   width, height}, seed (decimal string), nsfw_detected, replaced}],
   *   `info` and `warnings`.
   */
  generate(prompt, options = {}, onEvent = undefined) {
    const request = generateRequest(prompt, options);
    const { signal } = options;
    if (signal && signal.aborted) return Promise.reject(signal.reason);
    return new Promise((resolve, reject) => {
      const call = this._imagegen.Generate(request, this._metadata(), this._callOptions());
      let result = null;
      let settled = false;
      const onAbort = () => fail(signal.reason);
      const settle = () => {
        if (settled) return false;
        settled = true;
        if (signal) signal.removeEventListener('abort', onAbort);
        return true;
      };
      const fail = (err) => {
        if (!settle()) return;
        call.cancel();
        reject(err);
      };
      call.on('data', (response) => {
        if (settled) return;
        try {
          if (onEvent) onEvent(response);
        } catch (err) {
          fail(err);
          return;
        }
        if (response.event === 'result') result = response.result;
      });
      call.on('error', fail);
      call.on('end', () => {
        if (result === null) fail(new Error('the generation stream ended without a result'));
        else if (settle()) resolve(result);
      });
      if (signal) signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  /**
   * Health of the server or one of its services.
   * @param {string} [service] full service name, e.g. "imago.v1.ImageGenService";
   *   "" (default) for the server as a whole.
   * @returns {Promise<string>} "SERVING", "NOT_SERVING" or "UNKNOWN".
   */
  async health(service = '') {
    const reply = await this._unary(this._health, 'Check', { service });
    return reply.status;
  }
}

module.exports = {
  DEFAULT_TARGET,
  DEFAULT_MAX_MESSAGE_BYTES,
  GENERATION_FIELDS,
  ImagoClient,
  askRequest,
  captionRequest,
  fieldViolations,
  generateRequest,
  mimeType,
  retryDelaySeconds,
  statusName,
  uint64,
};
