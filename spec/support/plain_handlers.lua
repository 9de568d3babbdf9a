-- Handlers in a module that does not require commandbus itself.
return {
  Double = function(cmd) return {twice = cmd.data.n * 2} end,
}
