-- Argo CD health check for Kiln's TrainingJob and ExportJob (kiln.dev/v1alpha1): one script for both kinds, set
-- in argocd-cm as resource.customizations.health.kiln.dev_TrainingJob and ..._ExportJob (docs/operations.md,
-- "GitOps"). Argo CD runs it with gopher-lua, so it keeps to Lua 5.1 and the base, string and table libraries.
--
-- status.phase decides the health: Succeeded is Healthy, Failed Degraded, Suspended Suspended, and every phase
-- still on its way (Pending, Queued, Running, Restarting) Progressing. The message is the reason and message of
-- the condition that explains the phase, so the Argo CD UI says why without a kubectl describe.

local settled = {Succeeded = "Healthy", Failed = "Degraded", Suspended = "Suspended"}
local under_way = {Pending = true, Queued = true, Running = true, Restarting = true}

-- The conditions that explain each phase, in order of preference: the first one that holds is shown.
local explained_by = {
  Succeeded = {"Succeeded"},
  Failed = {"Failed"},
  Suspended = {"Suspended"},
  Running = {"Running"},
  Restarting = {"Restarting"},
  Queued = {"Queued"},
  Pending = {"WaitingForSource", "Restarting", "Queued", "Created"},
}

local function holding(conditions, wanted)
  for _, condition in ipairs(conditions) do
    if condition.type == wanted and condition.status == "True" then
      return condition
    end
  end
  return nil
end

local function describe(condition)
  local reason = condition.reason or condition.type
  if condition.message ~= nil and condition.message ~= "" then
    return reason .. ": " .. condition.message
  end
  return reason
end

-- The newest generation the operator has acted on. A TrainingJob's status.observedGeneration waits while a spec
-- change is pending, but the SpecChangePending condition records the generation it was set for, so the operator
-- has seen generation g once either says so. nil when neither records a generation: then nothing is known.
local function seen_generation(status, conditions)
  local seen = status.observedGeneration
  for _, condition in ipairs(conditions) do
    if condition.observedGeneration ~= nil and (seen == nil or condition.observedGeneration > seen) then
      seen = condition.observedGeneration
    end
  end
  return seen
end

local function check(object)
  local status = object.status
  if status == nil or status.phase == nil then
    return {status = "Progressing", message = "Waiting for the Kiln operator to report a status"}
  end
  local phase, conditions = status.phase, status.conditions or {}
  local health = settled[phase]
  if health == nil and not under_way[phase] then
    return {status = "Unknown", message = "Unknown phase " .. phase .. " (is the Kiln operator newer than this check?)"}
  end

  local message = phase
  for _, wanted in ipairs(explained_by[phase]) do
    local condition = holding(conditions, wanted)
    if condition ~= nil then
      message = describe(condition)
      break
    end
  end
  local progress = status.progress
  if phase == "Running" and progress ~= nil and progress.totalEpochs ~= nil and progress.totalEpochs > 0 then
    message = message .. " (epoch " .. tostring(progress.epoch or 0) .. "/" .. tostring(progress.totalEpochs) .. ")"
  end
  if health == nil then
    return {status = "Progressing", message = message}
  end

  -- A settled job whose latest spec the operator has not acted on yet may be about to move again (raising
  -- spec.epochs continues a Succeeded TrainingJob): say so instead of reporting the old result as current.
  local generation = object.metadata and object.metadata.generation
  local seen = seen_generation(status, conditions)
  if generation ~= nil and seen ~= nil and seen < generation then
    return {
      status = "Progressing",
      message = "Waiting for the Kiln operator to act on generation " .. tostring(generation) .. " (" .. message .. ")",
    }
  end
  local pending = holding(conditions, "SpecChangePending")
  if pending ~= nil then
    message = message .. "; " .. describe(pending)
  end
  return {status = health, message = message}
end

return check(obj)
