'use strict';
/**
 * Reading a failed call's status: the name of its code and the
 * google.rpc details (BadRequest, RetryInfo) the server attaches in the
 * grpc-status-details-bin trailer.
 */

const grpc = require('@grpc/grpc-js');
const { detailDecoders } = require('./protos');

/**
 * The name of a gRPC status code: 3 -> "INVALID_ARGUMENT"; "UNKNOWN" for
 * numbers gRPC does not define.
 * @param {number} code
 * @returns {string}
 */
function statusName(code) {
  const name = Object.keys(grpc.status).find((key) => grpc.status[key] === code);
  return name ?? 'UNKNOWN';
}

function statusDetails(err, typeName, decoder) {
  const values = err && err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (values.length === 0 || !Buffer.isBuffer(values[0])) return [];
  try {
    const status = decoder.requestDeserialize(values[0]);
    return status.details
      .filter((detail) => detail.type_url.endsWith(`/${typeName}`))
      .map((detail) => decoder.responseDeserialize(detail.value));
  } catch {
    return []; // details that do not decode: the status line is what counts
  }
}

/**
 * The request fields a failed call was refused for, from the
 * google.rpc.BadRequest the server attaches (INVALID_ARGUMENT,
 * FAILED_PRECONDITION, NOT_FOUND): [{field: "steps", description: "..."}].
 * Empty when there is none.
 * @param {Error} err a rejection of an ImagoClient method
 * @returns {{field: string, description: string}[]}
 */
function fieldViolations(err) {
  const badRequests = statusDetails(err, 'google.rpc.BadRequest', detailDecoders.BadRequest);
  return badRequests.flatMap((badRequest) =>
    badRequest.field_violations.map(({ field, description }) => ({ field, description })),
  );
}

/**
 * Seconds after which a retry may succeed, from the google.rpc.RetryInfo the
 * server attaches to RESOURCE_EXHAUSTED (queue full); null when there is none.
 * @param {Error} err
 * @returns {number|null}
 */
function retryDelaySeconds(err) {
  const [info] = statusDetails(err, 'google.rpc.RetryInfo', detailDecoders.RetryInfo);
  if (!info || !info.retry_delay) return null;
  return Number(info.retry_delay.seconds) + info.retry_delay.nanos / 1e9;
}

module.exports = {
  fieldViolations,
  retryDelaySeconds,
  statusDetails,
  statusName,
};
