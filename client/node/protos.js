'use strict';
/**
 * The imago .proto files, loaded at run time: the message definitions, the
 * gRPC service constructors and the decoders for google.rpc status details.
 *
 * The imago.v1 protos come from the repository's protos/ directory;
 * grpc.health.v1 and the google.rpc error details from client/node/protos/.
 * Field names keep the proto's case (snake_case), uint64 values load as
 * decimal strings and enum values as their names.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS_DIR = path.join(__dirname, '..', '..', 'protos');
const LOCAL_PROTOS_DIR = path.join(__dirname, 'protos');

const definition = protoLoader.loadSync(
  [
    'imago/v1/caption.proto',
    'imago/v1/vqa.proto',
    'imago/v1/imagegen.proto',
    'grpc/health/v1/health.proto',
    'imago_node/status_details.proto',
  ],
  {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTOS_DIR, LOCAL_PROTOS_DIR],
  },
);
const services = grpc.loadPackageDefinition(definition);
const detailDecoders = definition['imago_node.StatusDetailDecoders'];

module.exports = {
  LOCAL_PROTOS_DIR,
  PROTOS_DIR,
  definition,
  detailDecoders,
  services,
};
