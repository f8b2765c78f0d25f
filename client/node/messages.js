'use strict';
/**
 * Request messages for an imago server from camelCase options, checked
 * before anything is sent: GenerationSettings, CaptionRequest, AskRequest and
 * GenerateRequest, with the value checks and enum tables they use. Argument
 * errors throw TypeError or RangeError; ranges not checked here are checked
 * by the server, which names the field.
 */

const { definition } = require('./protos');

/** Names of the GenerationSettings fields, as the proto spells them. */
const GENERATION_FIELDS = definition['imago.v1.GenerationSettings'].type.field.map((f) => f.name);

const IMAGE_FORMATS = {
  png: 'IMAGE_FORMAT_PNG',
  jpeg: 'IMAGE_FORMAT_JPEG',
  jpg: 'IMAGE_FORMAT_JPEG',
  webp: 'IMAGE_FORMAT_WEBP',
};
/** Preview methods by name ("latent_rgb"), from the API's PreviewMethod enum. */
const PREVIEW_METHODS = Object.fromEntries(
  definition['imago.v1.PreviewMethod'].type.value
    .map((value) => value.name)
    .filter((name) => name !== 'PREVIEW_METHOD_UNSPECIFIED')
    .map((name) => [name.replace(/^PREVIEW_METHOD_/, '').toLowerCase(), name]),
);
const MAX_UINT64 = 2n ** 64n - 1n;

// ------------------------------------------------------------------ values

function camelCase(name) {
  return name.replace(/_([a-z])/g, (_, letter) => letter.toUpperCase());
}

/** MIME type of encoded image bytes from their signature; "" when unknown. */
function mimeType(data) {
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (bytes.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))) {
    return 'image/png';
  }
  if (bytes.subarray(0, 3).equals(Buffer.from([0xff, 0xd8, 0xff]))) return 'image/jpeg';
  if (bytes.toString('latin1', 0, 4) === 'RIFF' && bytes.toString('latin1', 8, 12) === 'WEBP') {
    return 'image/webp';
  }
  return '';
}

function imageMessage(data, name) {
  if (!(data instanceof Uint8Array)) {
    throw new TypeError(`${name} must be a Buffer or Uint8Array of encoded image bytes`);
  }
  return { data, mime_type: mimeType(data) };
}

function uint32(value, name) {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new RangeError(`${name} must be an integer in 0..4294967295, got ${value}`);
  }
  return value;
}

function number(value, name) {
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new TypeError(`${name} must be a finite number, got ${value}`);
  }
  return value;
}

/**
 * A seed (0..2^64-1, a number, bigint or decimal string) as a decimal string.
 * @param {number|bigint|string} value
 * @param {string} [name]
 * @returns {string}
 */
function uint64(value, name = 'seed') {
  let big;
  try {
    big = typeof value === 'string' && !/^\d+$/.test(value) ? -1n : BigInt(value);
  } catch {
    big = -1n;
  }
  if (big < 0n || big > MAX_UINT64 || (typeof value === 'number' && !Number.isSafeInteger(value))) {
    throw new RangeError(`${name} must be an integer in 0..2^64-1, got ${value}`);
  }
  return big.toString();
}

function enumValue(table, value, name) {
  const found = table[String(value).toLowerCase().replace(/^\./, '')];
  if (found === undefined) {
    throw new RangeError(`unknown ${name} ${value}; use ${Object.keys(table).join(', ')}`);
  }
  return found;
}

function checkKnown(options, known, what) {
  const unknown = Object.keys(options).filter((key) => !known.includes(key));
  if (unknown.length > 0) {
    throw new TypeError(`unknown ${what}: ${unknown.join(', ')}; known: ${known.join(', ')}`);
  }
}

// ------------------------------------------------------------------ requests

const GENERATION_OPTIONS = GENERATION_FIELDS.map(camelCase);

/**
 * GenerationSettings from camelCase options (maxNewTokens, numBeams, seed,
 * ...); undefined and null leave a field unset, for the server's default.
 */
function generationSettings(options) {
  const settings = {};
  for (const field of GENERATION_FIELDS) {
    const value = options[camelCase(field)];
    if (value === undefined || value === null) continue;
    if (field === 'seed') settings.seed = uint64(value);
    else if (field === 'do_sample') settings.do_sample = Boolean(value);
    else if (['temperature', 'top_p', 'repetition_penalty', 'length_penalty'].includes(field)) {
      settings[field] = number(value, camelCase(field));
    } else settings[field] = uint32(value, camelCase(field));
  }
  return settings;
}

/** A CaptionRequest; see {@link ImagoClient#caption}. */
function captionRequest(image, options = {}) {
  checkKnown(options, ['prefix', 'adapter', ...GENERATION_OPTIONS], 'caption option(s)');
  const { prefix = '', adapter = '', ...settings } = options;
  return {
    image: imageMessage(image, 'image'),
    prefix: String(prefix),
    adapter: String(adapter),
    generation: generationSettings(settings),
  };
}

/** An AskRequest; see {@link ImagoClient#ask}. */
function askRequest(image, question, options = {}) {
  checkKnown(options, ['adapter', ...GENERATION_OPTIONS], 'ask option(s)');
  const { adapter = '', ...settings } = options;
  return {
    image: imageMessage(image, 'image'),
    question: String(question),
    adapter: String(adapter),
    generation: generationSettings(settings),
  };
}

const GENERATE_OPTIONS = [
  'negativePrompt', 'width', 'height', 'steps', 'guidanceScale', 'seed', 'numImages',
  'outputFormat', 'outputQuality', 'omitParameters', 'scheduler', 'loras',
  'previewEvery', 'previewFormat', 'previewMaxSize', 'previewMethod', 'previewAllImages',
  'initImage', 'strength', 'maskImage', 'styleImage', 'styleScale', 'signal',
];

function task(options) {
  const { initImage, maskImage, styleImage, strength = 0, styleScale = 0 } = options;
  if (maskImage !== undefined) {
    if (initImage === undefined) {
      throw new TypeError('maskImage needs initImage, the image to repaint');
    }
    return {
      inpaint: {
        image: imageMessage(initImage, 'initImage'),
        mask: imageMessage(maskImage, 'maskImage'),
        strength: number(strength, 'strength'),
      },
    };
  }
  if (initImage === undefined) return { text_to_image: {} };
  const redraw = {
    init_image: imageMessage(initImage, 'initImage'),
    strength: number(strength, 'strength'),
  };
  if (styleImage !== undefined) {
    redraw.style_image = imageMessage(styleImage, 'styleImage');
    redraw.style_scale = number(styleScale, 'styleScale');
  }
  return { image_to_image: redraw };
}

/**
 * A GenerateRequest with the same fields and defaults the Python client's
 * generate_request sends; see {@link ImagoClient#generate}.
 */
function generateRequest(prompt, options = {}) {
  checkKnown(options, GENERATE_OPTIONS, 'generate option(s)');
  const o = options;
  const request = {
    prompt: String(prompt),
    negative_prompt: String(o.negativePrompt ?? ''),
    width: uint32(o.width ?? 0, 'width'),
    height: uint32(o.height ?? 0, 'height'),
    steps: uint32(o.steps ?? 0, 'steps'),
    num_images: uint32(o.numImages ?? 1, 'numImages'),
    output_format: enumValue(IMAGE_FORMATS, o.outputFormat ?? 'png', 'outputFormat'),
    previews: {
      every_n_steps: uint32(o.previewEvery ?? 0, 'previewEvery'),
      format: enumValue(IMAGE_FORMATS, o.previewFormat ?? 'jpeg', 'previewFormat'),
      max_size: uint32(o.previewMaxSize ?? 0, 'previewMaxSize'),
      method: enumValue(PREVIEW_METHODS, o.previewMethod ?? 'latent_rgb', 'previewMethod'),
      all_images: Boolean(o.previewAllImages),
    },
    scheduler: String(o.scheduler ?? ''),
    output_quality: uint32(o.outputQuality ?? 0, 'outputQuality'),
    omit_parameters: Boolean(o.omitParameters),
    loras: Object.entries(o.loras ?? {}).map(([name, weight]) => ({
      name,
      weight: number(weight, `loras.${name}`),
    })),
    ...task(o),
  };
  if (o.guidanceScale !== undefined && o.guidanceScale !== null) {
    request.guidance_scale = number(o.guidanceScale, 'guidanceScale');
  }
  if (o.seed !== undefined && o.seed !== null) request.seed = uint64(o.seed);
  return request;
}

module.exports = {
  GENERATION_FIELDS,
  askRequest,
  captionRequest,
  checkKnown,
  generateRequest,
  generationSettings,
  mimeType,
  number,
  uint64,
};
