-- The worker's handler module for the saga specs (loaded per lane).
return require("spec.support.saga").handlers
