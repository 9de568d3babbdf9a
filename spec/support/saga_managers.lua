-- The reply router's managers module for the saga specs (loaded per lane).
return require("spec.support.saga").managers
