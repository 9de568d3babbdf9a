-- The bench's process managers: the three-step order saga of spec/support.
return require("spec.support.saga").managers
